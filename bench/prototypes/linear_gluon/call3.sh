#!/usr/bin/env bash
# Session 28, call 3 (one H200): speedsd bench --targets on this tree (the conv table with the VAE's sub-pixel
# entries, which session 27's targets run did not have).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 480 python -m speedsd.bench.e2e --targets --reps 12 --name e2e_targets --out $OUT 2>&1 | grep -v "it/s\]" | tail -40 > $OUT/targets_log.txt
tail -25 $OUT/targets_log.txt
