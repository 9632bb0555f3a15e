#!/usr/bin/env bash
# Issue 9's side-by-side probes of the ChatTS-14B-0801 shape (built from config, random values) on 2 GPUs:
# the usual recipe and ours from one run, ours under a 22 GiB cap per process, parameter offload, the users'
# lengths (421 samples of make-data --scale 1, the ratio of offload to none and the 2080 Ti job estimate),
# and ZeRO++ quantized weight gathers. One JSON report per variant in $OUT, kernel tables in $OUT/kernels.txt.
#   bash benchmarks/speed_runs.sh VARIANT...   (GPU machine, wheels installed, PATH/PYTHONPATH set)
set -uo pipefail
OUT=${OUT:-runs/speed}; W=${WORK:-runs/speed_work}; mkdir -p "$OUT" "$W/prof"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the users' data needs a tokenizer + ts config folder: $TOKENIZER (tokenizer files + a ChatTS config.json)
USERS="--data gdsh,hbsn,whlj,zhlh --dataset-dir $W/data --tokenizer ${TOKENIZER:-$W/tiny}"
declare -A V=(
  [baseline_4096]="--no-offload --seq-len 4096 --baseline hf --profile $W/prof"
  [ours_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22"
  [param_cap22_4096]="--offload param --seq-len 4096 --gpu-mem-gb 22 --profile $W/prof"
  [users_param]="--offload param --gpu-mem-gb 22 $USERS --profile $W/prof --compare-offload none"
  [users_none]="--no-offload --gpu-mem-gb 22 $USERS --profile $W/prof"
  [zpp_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --zero zero_quantized_weights=true"
  [hostckpt_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --checkpoints-on-cpu --profile $W/prof"
  [hostckpt_phases_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --checkpoints-on-cpu --phases"
  [phases_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --phases"
  [live1e8_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --zero stage3_max_live_parameters=1e8 --phases"
  [layers_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --whole-layers --profile $W/prof"
  [lean_phases_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --phases"
  [plain_phases_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --phases --plain-activations --zero memory_efficient_linear=true"
  [hostckpt_cap16_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 16.5 --checkpoints-on-cpu --phases"
  [hostckpt_gc_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --checkpoints-on-cpu --phases"
  [layers_reuse_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --whole-layers --zero stage3_max_reuse_distance=3e8 --profile $W/prof"
  [layers_reuse_live6_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --whole-layers --zero stage3_max_reuse_distance=3e8 --zero stage3_max_live_parameters=6e8 --profile $W/prof"
  [hostckpt_live2_gc_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --checkpoints-on-cpu --zero stage3_max_live_parameters=2e8 --phases"
  [hostckpt_gc_nccl4_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --checkpoints-on-cpu --phases"
  [layers_hostckpt_gc_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --whole-layers --checkpoints-on-cpu --phases --profile $W/prof"
  [fused_phases_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --phases"
  [eager_phases_cap22_4096]="--no-offload --seq-len 4096 --gpu-mem-gb 22 --phases --eager-kernels"
  [baseline_layers_4096]="--no-offload --seq-len 4096 --baseline hf --whole-layers --profile $W/prof"
  [layers_4096]="--no-offload --seq-len 4096 --whole-layers"
  [layers_prefetch_4096]="--no-offload --seq-len 4096 --whole-layers --zero stage3_prefetch_bucket_size=3.1e8"
)
# variants that differ in the environment only
declare -A E=(
  [hostckpt_gc_cap22_4096]="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,garbage_collection_threshold:0.7"
  [hostckpt_live2_gc_cap22_4096]="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,garbage_collection_threshold:0.6"
  [hostckpt_gc_nccl4_cap22_4096]="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,garbage_collection_threshold:0.7 NCCL_MAX_NCHANNELS=4"
  [layers_hostckpt_gc_cap22_4096]="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,garbage_collection_threshold:0.7"
)
for name in "$@"; do
  if [[ $name == users_* && ! -f $W/data/dataset_info.json ]]; then  # the users' shape: 421 samples, tokenizer + ts config
    [ -n "${TOKENIZER:-}" ] || python3 -m chatts_train.cli make-tiny --out "$W/tiny" >> "$OUT/speed.err" 2>&1
    python3 -m chatts_train.cli make-data --out "$W/data" --scale 1 >> "$OUT/speed.err" 2>&1
  fi
  echo "== $name ($(date +%T)): ${E[$name]:-} python3 benchmarks/memprobe.py ${V[$name]} --json" | tee -a "$OUT/speed.log"
  env ${E[$name]:-} timeout "${T:-420}" python3 benchmarks/memprobe.py ${V[$name]} --json > "$OUT/$name.json" 2>> "$OUT/speed.err"
  python3 - "$OUT/$name.json" <<'PY' | tee -a "$OUT/speed.log"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no report: {e}")
keys = ("ok", "seq_len", "micro_step_s", "tokens_per_s_per_gpu", "mfu", "hfu", "device_peak_gib", "peak_allocated_gib",
        "peak_reserved_gib", "alloc_retries", "phase_peaks_gib", "device_peak_by_section_gib", "inactive_split_peak_gib",
        "reserved_after_setup_gib", "outside_allocator_after_setup_gib", "outside_allocator_gib", "link_bytes_per_micro_step", "budget", "job_on_2080ti", "baseline",
        "compare", "verdict")
for k in keys:
    if k in r:
        print(f"  {k}: {r[k]}")
print("  losses:", [round(x, 4) for x in r.get("losses") or []])
PY
done
for f in "$W"/prof/*.txt; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done > "$OUT/kernels.txt"
