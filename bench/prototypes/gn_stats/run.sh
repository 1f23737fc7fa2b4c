#!/bin/bash
# GPU call: the statistics-launch probe, then ncu's source view of the engine's stats kernel (2x320x64²).
set -u
OUT=$1; R=$(cd "$(dirname "$0")/../../.." && pwd)
export PYTHONPATH=$R/src:$R/bench/prototypes/gn_stats PYTHONUNBUFFERED=1
timeout 330 python "$R/bench/prototypes/gn_stats/probe.py" "$OUT/gn_stats_probe.json" 2>&1 | grep -v Warn
ncu --profile-from-start off --clock-control none --cache-control none --section SourceCounters --section WarpStateStats --section SpeedOfLight --import-source no -f -o /tmp/gn python "$R/bench/prototypes/gn_stats/one.py" > /tmp/ncu_gn.log 2>&1
echo "ncu gn rc $?"
ncu --import /tmp/gn.ncu-rep --csv --page source --print-source sass 2>/dev/null | gzip > "$OUT/gn_source.csv.gz"
ncu --import /tmp/gn.ncu-rep --csv --page details > "$OUT/gn_details.csv" 2>/dev/null
