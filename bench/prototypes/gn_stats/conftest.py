"""The engine tests' setup (tests/conftest.py: the CPU interpreter and its numpy patch) for this folder's test."""

import pathlib
import runpy

globals().update(runpy.run_path(str(pathlib.Path(__file__).resolve().parents[3] / "tests" / "conftest.py")))
