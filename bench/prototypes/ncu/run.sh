#!/bin/bash
# Hardware counters of one eager UNet step's kernels (Nsight Compute, Firecracker machines: device/KINDS.md).
# bash run.sh OUTDIR [LAUNCHES]: OUTDIR/details.csv (every profiled kernel's sections), OUTDIR/raw.csv (the
# metrics named below), OUTDIR/attn_source.csv.gz (the d=40 attention's SASS with stall samples).
set -u
OUT=$1; N=${2:-170}; R=$(cd "$(dirname "$0")/../../.." && pwd)
export PYTHONPATH=$R/src PYTHONUNBUFFERED=1
SECTIONS="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis"
ncu --profile-from-start off --clock-control none --launch-count "$N" $SECTIONS -f -o /tmp/step python "$R/bench/prototypes/ncu/step.py" > /tmp/ncu_step.log 2>&1
echo "ncu step rc $?"; tail -3 /tmp/ncu_step.log
ncu --import /tmp/step.ncu-rep --csv --page details > "$OUT/details.csv" 2>/dev/null; echo "details rows $(wc -l < "$OUT/details.csv")"
M=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum,dram__bytes.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,launch__grid_size,sm__cycles_active.avg,gpc__cycles_elapsed.max
ncu --query-metrics > /tmp/q.txt 2>&1
M=$(for m in ${M//,/ }; do grep -q "^${m%%.*} " /tmp/q.txt && echo -n "$m,"; done); M=${M%,}; echo "metrics: $M"
ncu --profile-from-start off --clock-control none --launch-count "$N" --metrics $M --csv python "$R/bench/prototypes/ncu/step.py" > "$OUT/raw.csv" 2>/tmp/ncu_raw.err
echo "ncu raw rc $?"; tail -2 /tmp/ncu_raw.err
ncu --profile-from-start off --clock-control none -k regex:attn_fwd --launch-count 1 --section SourceCounters --section WarpStateStats --import-source no -f -o /tmp/attn python "$R/bench/prototypes/ncu/step.py" > /tmp/ncu_attn.log 2>&1
echo "ncu attn rc $?"
ncu --import /tmp/attn.ncu-rep --csv --page source --print-source sass 2>/dev/null | gzip > "$OUT/attn_source.csv.gz"
ncu --import /tmp/attn.ncu-rep --csv --page details > "$OUT/attn_details.csv" 2>/dev/null
ls -la "$OUT"
