#!/usr/bin/env bash
# A/B of the pinned partitions' layout under parameter offload, on one machine: memprobe on the 14B folder at
# the users' longest sample, partitions pinned in 1 GiB chunks (default) vs DeepSpeed pinning each on its own
# (CHATTS_PIN_IN_CHUNKS=0), alternating. One JSON line per probe in $OUT/pin_ab.jsonl.
#   bash benchmarks/pin_ab.sh   (after real_job.sh's "write" phase; GPU machine, PATH/PYTHONPATH set)
set -uo pipefail
OUT=${OUT:-runs/real_job}; MODEL=${MODEL:-runs/real/ChatTS-14B}; SEQ=${SEQ:-2158}; mkdir -p "$OUT"
for chunks in ${ORDER:-1 0 1}; do
  CHATTS_PIN_IN_CHUNKS=$chunks timeout 200 python3 benchmarks/memprobe.py --model "$MODEL" --offload param \
    --seq-len "$SEQ" --gpu-mem-gb 22 --json 2>> "$OUT/probes.err" | python3 -c "
import json, sys
r = json.load(sys.stdin)
print(json.dumps({'pin_in_chunks': $chunks, 'micro_step_s': r.get('micro_step_s'), 'times': [round(t, 3) for t in r['ranks'][0].get('micro_step_times', [])],
                  'host_rss_after_load_gib': r.get('host_rss_after_load_gib'), 'host_peak_gib': r.get('host_peak_gib'),
                  'peak_allocated_gib': r.get('peak_allocated_gib'), 'device_peak_gib': r.get('device_peak_gib')}))" | tee -a "$OUT/pin_ab.jsonl"
done
