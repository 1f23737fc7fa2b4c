#!/usr/bin/env bash
# Session 29, call 1 (one H200): the wider cuBLASLt search (probe.py), one process per problem; the kernel list of
# one eager UNet step at this commit.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/rows
for i in $(seq 0 9); do
  timeout 75 python bench/prototypes/gemm_enum/probe.py /tmp/rows/r$i.json $i 2>&1 | tail -3
done
python bench/prototypes/gemm_enum/probe.py merge $OUT/gemm_enum_probe_h200.json /tmp/rows/r*.json
timeout 90 python bench/prototypes/attention_probes/kernel_list.py $OUT/kernel_list_h200_$SPEEDSD_COMMIT.txt 2>&1 | tail -2
