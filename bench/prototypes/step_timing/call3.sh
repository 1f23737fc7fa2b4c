#!/usr/bin/env bash
# Session 29, call 3 (one H200): speedsd bench --targets with the back-to-back columns (ours and the peers').
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 500 python -m speedsd.bench.e2e --targets --reps 12 --name e2e_targets --out $OUT 2>&1 | grep -v "it/s\]" | tail -40 > $OUT/e2e_targets_log_h200.txt
head -40 $OUT/e2e_targets.md
