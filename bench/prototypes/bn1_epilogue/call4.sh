#!/usr/bin/env bash
# Session 27, call 4 (one H200): speedsd bench --targets on this tree (its conv table with the sub-pixel entries),
# then image A/B, fresh processes alternating: the table without the four sub-pixel entries vs the committed one.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
T=src/speedsd/data/conv_table.json
python - "$T" /tmp/nosub.json <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
card = t["cards"]["NVIDIA H200"]
drop = [k for k, v in card.items() if v.get("subpixel")]
for k in drop:
    del card[k]
json.dump(t, open(sys.argv[2], "w"), indent=1)
print("dropped", len(drop), "sub-pixel entries")
PY
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/ab.txt
timeout 330 python -m speedsd.bench.e2e --targets --reps 12 --name e2e_targets --out $OUT 2>&1 | grep -v "it/s\]" | tail -30 > $OUT/targets_log.txt
for i in 1 2; do
  timeout 60 python bench/prototypes/conv_wide/ab.py image nosub /tmp/nosub.json 2>&1 | tail -1 | tee -a $OUT/ab.txt
  timeout 60 python bench/prototypes/conv_wide/ab.py image sub $T 2>&1 | tail -1 | tee -a $OUT/ab.txt
done
