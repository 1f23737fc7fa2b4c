#!/usr/bin/env bash
# Session 28, call 4 (one H200): cuBLASLt GPU tests, the GEMM algorithm sweep with --table, A/B of gemm_algos
# (fresh processes alternating), the graph/fidelity tests with the new table.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src:tests PYTHONUNBUFFERED=1
T=src/speedsd/data/gemm_table.json
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/ab_gemm_algos_h200.txt
timeout 120 python -m pytest -q -o addopts="" tests/test_cublaslt.py 2>&1 | tail -15 | tee $OUT/gpu_pytest_h200_s28.txt
timeout 240 python -m speedsd.bench.gemm_algos --out $OUT --table $T 2>&1 | tail -45
cp $T $OUT/gemm_table.json
for i in 1 2 3; do
  timeout 70 python bench/prototypes/gemm_algos/ab.py pair$i off 2>&1 | tail -1 | tee -a $OUT/ab_gemm_algos_h200.txt
  timeout 70 python bench/prototypes/gemm_algos/ab.py pair$i on 2>&1 | tail -1 | tee -a $OUT/ab_gemm_algos_h200.txt
done
timeout 100 python -m pytest -q -o addopts="" tests/test_graphs.py 2>&1 | tail -4 | tee -a $OUT/gpu_pytest_h200_s28.txt
