#!/usr/bin/env bash
# Session 28, call 6 (one H200): the GEMM algorithm sweep at 768² for the SD-1.4 geometry and SD 2.1-v, adding
# their entries to the GEMM table (--table keeps the 512² ones).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
T=src/speedsd/data/gemm_table.json
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/sd14 $OUT/sd21
timeout 200 python -m speedsd.bench.gemm_algos --out $OUT/sd14 --table $T --size 768 2>&1 | grep -A3 "torch's linears"
timeout 200 python -m speedsd.bench.gemm_algos --out $OUT/sd21 --table $T --size 768 --model random:sd2.1 2>&1 | grep -A3 "torch's linears"
cp $T $OUT/gemm_table.json
