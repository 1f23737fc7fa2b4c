#!/bin/bash
# Session 28, call 1 (one H200): the VAE sub-pixel decode A/B, then the cuBLASLt algorithm probe.
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/call1_log.txt
for i in 1 2 3; do
  for m in without with; do
    timeout 150 python bench/prototypes/vae_subpixel/decode_ab.py $m "pair$i" 2>&1 | grep -v Warning | tee -a $OUT/ab_vae_subpixel_decode_h200.txt
  done
done
timeout 330 python bench/prototypes/cublaslt/probe.py $OUT/cublaslt_probe_h200.json 2>&1 | tee -a $OUT/call1_log.txt
