#!/usr/bin/env bash
# Session 29, call 5 (one H200): GroupNorm from K-split partials, knob sweep (probe.py).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python bench/prototypes/gn_partials/probe.py $OUT/gn_partials_probe_h200.json 2>&1 | tail -24
