"""speedsd/__init__.py: the package import sets a small cuBLAS workspace unless the user chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import os, speedsd; print([os.environ.get(k) for k in ('CUBLAS_WORKSPACE_CONFIG', 'CUBLASLT_WORKSPACE_SIZE')])"
KEYS = ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, [":16:8", "128"]),  # neither set: the small workspace for both
        ({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, [":4096:8", None]),  # the user's choice, untouched
        ({"CUBLASLT_WORKSPACE_SIZE": "4096"}, [None, "4096"]),
    ],
)
def test_cublas_workspace_default_and_user_choice(given: dict[str, str], expected: list[str | None]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in KEYS} | given
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(expected)
