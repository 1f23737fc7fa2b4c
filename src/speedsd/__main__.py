"""``python -m speedsd ...`` runs the command line (see speedsd.cli)."""

import sys

from speedsd.cli import main

sys.exit(main())
