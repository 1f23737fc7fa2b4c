#!/usr/bin/env bash
# Session 27, call 1 (one H200): GPU tests of the bn + bn1 epilogue (residual + per-channel statistics), the UNet's
# conv2 epilogue sweep recorded into the conv table, then image A/B (fresh processes alternating): the session
# start's table (no UNet epilogue entries) vs the table with them; same code.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
cp $T /tmp/t0.json
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/log.txt
python -m pytest -q -o addopts="" -m gpu tests/kernels/test_conv_gluon_epilogue.py tests/kernels/test_gn_tile_stats.py \
  tests/kernels/test_conv_gluon.py 2>&1 | tail -25 | tee $OUT/gpu_pytest.txt
python -m speedsd.bench.conv_epilogue --out $OUT --shapes unet --table $T 2>&1 | tail -40 | tee -a $OUT/log.txt
cp $T $OUT/conv_table.json
for i in 1 2; do
  python bench/prototypes/conv_wide/ab.py image base /tmp/t0.json 2>&1 | tail -2 | tee -a $OUT/ab.txt
  python bench/prototypes/conv_wide/ab.py image epi $T 2>&1 | tail -2 | tee -a $OUT/ab.txt
done
