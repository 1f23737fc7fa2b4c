#!/usr/bin/env bash
# Session 29, call 7 (one H200): one eager UNet step's device time by block and latent level (block_times.py).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python bench/prototypes/step_timing/block_times.py $OUT/block_times_h200.txt 2>&1 | grep -v USDT | tail -40
