#!/usr/bin/env bash
# Session 27, call 2 (one H200): the GPU graph/fidelity tests on this tree (the generalised GroupNorm merge serves
# the VAE's conv epilogues), then the 768² image A/B pending since session 26: the H200 conv table without
# its latent-96 entries (measured at dc8799a, kernels_conv_unet96_h200.md) vs with them; fresh processes
# alternating, 20-step DPM++ 2M, random:sd1.4 (SD-1 geometry) and random:sd2.1 at 768².
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
python - "$T" /tmp/no96.json <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
card = t["cards"]["NVIDIA H200"]
drop = [k for k, v in card.items() if v.get("measured_at") == "dc8799a"]
for k in drop:
    del card[k]
json.dump(t, open(sys.argv[2], "w"), indent=1)
print("dropped", len(drop), "latent-96 entries")
PY
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/ab768.txt
python -m pytest -q -o addopts="" tests/test_graphs.py -k "gpu or fidelity or graphs" 2>&1 | tail -6 | tee $OUT/gpu_pytest2.txt
for m in random:sd1.4 random:sd1.4 random:sd2.1; do
  for i in 1; do
    python bench/prototypes/conv_wide/ab.py image no96 /tmp/no96.json 768 $m 2>&1 | tail -1 | tee -a $OUT/ab768.txt
    python bench/prototypes/conv_wide/ab.py image with96 $T 768 $m 2>&1 | tail -1 | tee -a $OUT/ab768.txt
  done
done
