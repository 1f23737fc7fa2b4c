#!/usr/bin/env bash
# Session 27, call 6 (one H200, the session's last ~6 minutes of device time): the VAE decoder's upsamplers as one
# Gluon sub-pixel launch with GroupNorm statistics: the sweep recorded into the conv table (the VAE conv table's
# configs only, for time), the sub-pixel GPU tests (statistics included), then the fidelity test with that table.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/log.txt
timeout 110 python -m speedsd.bench.subpixel_gluon --out $OUT --shapes vae --table $T \
  --configs g16x16n128k64s4c2e2p,g8x16n256k64s4c2e2p,g16x16n128k64s4c2e4p,g8x16n128k64s4c1e1p 2>&1 | tail -12 \
  | tee -a $OUT/log.txt
cp $T $OUT/conv_table.json
timeout 50 python -m pytest -q -o addopts="" -m gpu tests/kernels/test_subpixel_conv_gluon.py 2>&1 | tail -4 \
  | tee $OUT/gpu_pytest.txt
timeout 80 python -m pytest -q -o addopts="" tests/test_graphs.py -k fidelity 2>&1 | tail -3 | tee -a $OUT/gpu_pytest.txt
