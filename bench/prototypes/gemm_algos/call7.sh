#!/usr/bin/env bash
# Session 28, call 7 (one H200): 768² SD 2.1-v image and UNet-step A/B of gemm_algos with call 6's table, fresh
# processes alternating.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/ab_gemm_algos_768_h200.txt
for i in 1 2; do
  for m in off on; do
    timeout 75 python bench/prototypes/gemm_algos/ab.py pair$i $m 768 random:sd2.1 2>&1 | tail -1 | tee -a $OUT/ab_gemm_algos_768_h200.txt
  done
done
