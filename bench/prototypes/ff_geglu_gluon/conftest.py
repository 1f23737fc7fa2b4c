"""The repository's test setup (tests/conftest.py: TRITON_INTERPRET=1 without CUDA, the interpreter patches)
for this prototype's tests."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "speedsd_tests_conftest", pathlib.Path(__file__).resolve().parents[3] / "tests" / "conftest.py"
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("__")})  # its fixtures and hooks
