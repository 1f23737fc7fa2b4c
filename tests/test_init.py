"""speedsd/__init__.py: the package import sets a small cuBLAS workspace unless the user chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import os, speedsd; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"


@pytest.mark.parametrize(("given", "expected"), [(None, ":16:8"), (":4096:8", ":4096:8")])
def test_cublas_workspace_default_and_user_choice(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if given is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = given
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
