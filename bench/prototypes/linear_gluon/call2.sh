#!/usr/bin/env bash
# Session 28, call 2 (one H200): the linear (Gluon 1x1 conv) GPU tests, then the sweep with --table, then image
# A/B (fresh processes alternating: the committed table vs the one with the linear entries), then the graph and
# fidelity tests with the new table.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src:tests PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
cp $T /tmp/before.json
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/ab_linear_gluon_h200.txt
timeout 150 python -m pytest -q -o addopts="" tests/kernels/test_linear_gluon.py 2>&1 | tail -5 | tee $OUT/gpu_pytest_h200_s28.txt
timeout 200 python -m speedsd.bench.linear_gluon --out $OUT --table $T 2>&1 | grep -v " err " | tail -40
cp $T $OUT/conv_table.json
for i in 1 2 3; do
  timeout 60 python bench/prototypes/conv_wide/ab.py image before /tmp/before.json 2>&1 | tail -1 | tee -a $OUT/ab_linear_gluon_h200.txt
  timeout 60 python bench/prototypes/conv_wide/ab.py image linear $T 2>&1 | tail -1 | tee -a $OUT/ab_linear_gluon_h200.txt
done
timeout 120 python -m pytest -q -o addopts="" tests/test_graphs.py 2>&1 | tail -4 | tee -a $OUT/gpu_pytest_h200_s28.txt
