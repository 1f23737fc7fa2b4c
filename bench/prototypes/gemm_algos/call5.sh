#!/usr/bin/env bash
# Session 28, call 5 (one H200): the cuBLASLt GPU tests (the split-weight case fixed), then speedsd bench --targets
# on this tree (gemm_algos on, with the GEMM table of call 4).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python -m pytest -q -o addopts="" tests/test_cublaslt.py 2>&1 | tail -3 | tee $OUT/gpu_pytest_h200_s28b.txt
timeout 420 python -m speedsd.bench.e2e --targets --reps 12 --name e2e_targets --out $OUT 2>&1 | grep -v "it/s\]" | tail -40 > $OUT/targets_log.txt
head -30 $OUT/e2e_targets.md
