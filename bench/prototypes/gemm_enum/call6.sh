#!/usr/bin/env bash
# Session 29, call 6 (one H200): the cuBLASLt GPU tests and gemm_algos (no --table) after the operands refactor.
set -uo pipefail
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python -m pytest -q -o addopts="" tests/test_cublaslt.py 2>&1 | tail -3 | tee $OUT/gpu_pytest_h200_s29.txt
timeout 300 python -m speedsd.bench.gemm_algos --out $OUT 2>&1 | tail -4
