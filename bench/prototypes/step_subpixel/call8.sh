#!/usr/bin/env bash
# Session 29, call 8 (one H200): the standalone UNet step as its own loop scope: GPU graph tests, then A/B in
# fresh processes alternating (old / new).
set -uo pipefail
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/step_subpixel_h200.txt
for i in 1 2; do
  timeout 75 python bench/prototypes/step_subpixel/ab.py pair$i old 2>&1 | tail -1 | tee -a $OUT/step_subpixel_h200.txt
  timeout 75 python bench/prototypes/step_subpixel/ab.py pair$i new 2>&1 | tail -1 | tee -a $OUT/step_subpixel_h200.txt
done
timeout 100 python -m pytest -q -o addopts="" -x tests/test_graphs.py 2>&1 | tail -3 | tee $OUT/gpu_pytest_h200_s29b.txt
