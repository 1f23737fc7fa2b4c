#!/usr/bin/env bash
# Session 29, call 4 (one H200): the peer's kernels in one UNet step (peer_kernels.py).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python bench/prototypes/step_timing/peer_kernels.py $OUT/peer_kernel_list_h200.txt 2>&1 | grep -v Warn | tail -14
