#!/usr/bin/env bash
# Session 29, call 2 (one H200): the step-timing probe (synced vs back-to-back vs do_bench, ours and the peer).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python bench/prototypes/step_timing/probe.py $OUT/step_timing_h200.json 2>&1 | grep -v Warning | tail -12
