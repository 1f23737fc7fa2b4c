#!/usr/bin/env bash
# Session 27, call 3 (one H200): the Gluon sub-pixel conv (one launch for the UNet's 16²/32² upsamplers in the
# loop): its GPU tests, the sweep against the engine's cuDNN phase conv + interleave recorded into the conv table,
# image A/B (fresh processes alternating: the table before vs after), the fidelity test with the new table, and
# the sweep at 96² latents (768² images).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
cp $T /tmp/t0.json
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/log.txt
timeout 150 python -m pytest -q -o addopts="" -m gpu tests/kernels/test_subpixel_conv_gluon.py 2>&1 | tail -15 \
  | tee $OUT/gpu_pytest.txt
timeout 120 python -m speedsd.bench.subpixel_gluon --out $OUT --table $T 2>&1 | tail -40 | tee -a $OUT/log.txt
cp $T $OUT/conv_table.json
for i in 1 2; do
  timeout 60 python bench/prototypes/conv_wide/ab.py image base /tmp/t0.json 2>&1 | tail -1 | tee -a $OUT/ab.txt
  timeout 60 python bench/prototypes/conv_wide/ab.py image gluon $T 2>&1 | tail -1 | tee -a $OUT/ab.txt
done
timeout 120 python -m pytest -q -o addopts="" tests/test_graphs.py -k fidelity 2>&1 | tail -3 | tee -a $OUT/log.txt
timeout 100 python -m speedsd.bench.subpixel_gluon --out $OUT --latent 96 --table $T 2>&1 | tail -12 \
  | tee -a $OUT/log.txt
cp $T $OUT/conv_table.json
