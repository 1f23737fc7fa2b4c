#!/usr/bin/env bash
# Session 27, call 5 (one H200): the GPU tests of the conv, ops, denoise, conv table and model suites on the final
# kernels and table, then one 768² image pair: the table without its sub-pixel entries vs the committed one.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
python - "$T" /tmp/nosub.json <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
card = t["cards"]["NVIDIA H200"]
for k in [k for k, v in card.items() if v.get("subpixel")]:
    del card[k]
json.dump(t, open(sys.argv[2], "w"), indent=1)
PY
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/ab768.txt
timeout 300 python -m pytest -q -o addopts="" tests/kernels/test_conv_gluon.py tests/kernels/test_conv_gluon_epilogue.py \
  tests/kernels/test_subpixel_conv_gluon.py tests/kernels/test_subpixel_conv.py tests/test_ops.py tests/test_denoise.py \
  tests/test_conv_table.py tests/models 2>&1 | tail -8 | tee $OUT/gpu_pytest.txt
timeout 75 python bench/prototypes/conv_wide/ab.py image nosub /tmp/nosub.json 768 2>&1 | tail -1 | tee -a $OUT/ab768.txt
timeout 75 python bench/prototypes/conv_wide/ab.py image sub $T 768 2>&1 | tail -1 | tee -a $OUT/ab768.txt
