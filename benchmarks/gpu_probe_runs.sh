#!/usr/bin/env bash
# Memory/speed probes of the ChatTS-14B-0801 shape on 2 GPUs, each process capped to 22 GiB (a 2080 Ti 22 GB)
# unless the variant says NOCAP.
# One JSON report per line in $OUT/probes.jsonl; stderr of each probe in $OUT/probes.log.
#   bash benchmarks/gpu_probe_runs.sh [variant ...]     (on the GPU machine, wheels installed, PYTHONPATH set)
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
KNOBS="--zero stage3_max_live_parameters=3e8 --zero stage3_max_reuse_distance=0 --zero stage3_prefetch_bucket_size=5e7"
declare -A V=(
  [base_4096]="--no-offload --seq-len 4096"
  [expseg_4096]="--no-offload --seq-len 4096 ENV_EXPSEG"
  [tuned_4096]="--no-offload --seq-len 4096 ENV_EXPSEG $KNOBS"
  [tuned_param_4096]="--offload param --seq-len 4096 ENV_EXPSEG $KNOBS"
  [tuned_8192]="--no-offload --seq-len 8192 ENV_EXPSEG $KNOBS"
  [tuned_param_8192]="--offload param --seq-len 8192 ENV_EXPSEG $KNOBS"
  [single_1432]="--no-offload --seq-len 1432 ENV_EXPSEG $KNOBS"
  [pack_1432x2_1200]="--no-offload --pack 1432,1432,1200 ENV_EXPSEG $KNOBS"
  [nocap_4096]="--no-offload --seq-len 4096 ENV_EXPSEG $KNOBS NOCAP"
)
for name in "$@"; do
  args=${V[$name]}
  env_prefix=()
  if [[ $args == *ENV_EXPSEG* ]]; then env_prefix=(env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); args=${args/ENV_EXPSEG/}; fi
  cap="--gpu-mem-gb 22"
  if [[ $args == *NOCAP* ]]; then cap=""; args=${args/NOCAP/}; fi
  echo "== $name: python3 benchmarks/memprobe.py $args $cap --json  ($(date +%T))" | tee -a "$OUT/probes.log"
  "${env_prefix[@]}" timeout 300 python3 benchmarks/memprobe.py $args $cap --json > "$OUT/probe.tmp" 2>> "$OUT/probes.log"
  python3 - "$name" "$args" "${env_prefix[*]}" <<'PY' >> "$OUT/probes.jsonl"
import json, sys
name, args, env = sys.argv[1:]
try:
    r = json.load(open(f"{__import__('os').environ['OUT']}/probe.tmp"))
except Exception as e:
    r = {"ok": False, "verdict": f"no report: {e}"}
r.update(variant=name, args=args.split(), env=env)
print(json.dumps(r))
keys = ("ok", "seq_len", "micro_step_s", "tokens_per_s_per_gpu", "mfu", "hfu", "time_to_first_step_s", "device_peak_gib",
        "peak_allocated_gib", "peak_reserved_gib", "alloc_retries", "host_peak_gib", "verdict")
print(name, {k: r.get(k) for k in keys}, file=sys.stderr)
PY
done
