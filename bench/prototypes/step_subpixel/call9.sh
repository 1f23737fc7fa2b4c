#!/usr/bin/env bash
# Session 29, call 9 (one H200): one more A/B pair after a warm-up process (call 8's first process ran past its
# limit compiling on a cold Triton cache, so that pair lost its "old" run).
set -uo pipefail
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/step_subpixel_h200_b.txt
timeout 130 python bench/prototypes/step_subpixel/ab.py warmup new 2>&1 | tail -1 | tee -a $OUT/step_subpixel_h200_b.txt
timeout 50 python bench/prototypes/step_subpixel/ab.py pair3 old 2>&1 | tail -1 | tee -a $OUT/step_subpixel_h200_b.txt
timeout 50 python bench/prototypes/step_subpixel/ab.py pair3 new 2>&1 | tail -1 | tee -a $OUT/step_subpixel_h200_b.txt
