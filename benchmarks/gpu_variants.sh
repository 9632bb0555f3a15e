#!/usr/bin/env bash
# One runner for GPU variants: a table of named variants, each a command with its environment. Every variant
# appends one JSON line to $OUT/results.jsonl (the variant, its command, rc, wall time and what it measured:
# memprobe's report, plain_peft.py's lines, or the loop's metrics rows, [plan] line and setup.json) and its
# log to $OUT/logs/<name>.log (packed into $OUT/logs.tgz at the end).
#   bash benchmarks/gpu_variants.sh NAME...      (GPU machine, wheels installed, PYTHONPATH set)
#   bash benchmarks/gpu_variants.sh --list
# `data` writes the random-weight 14B folder (benchmarks/write_random_checkpoint.py) and data of the users'
# shape (make-data --scale 0.25: 105 samples, 723-2,158 positions); the loop variants need it first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}; W=${WORK:-/tmp/chatts-real}; mkdir -p "$OUT/logs" "$W"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MODEL=$W/ChatTS-14B; DATA=$W/data
PROBE="python3 benchmarks/memprobe.py --num-gpus 1 --seq-len 4096 --also-seq-len 1600 --json"
LOOP2="env NUM_GPUS=2 MODEL_PATH=$MODEL DATASET_DIR=$DATA bash launch.sh --max_steps ${STEPS:-3} --save_steps 0 --plot false --tensorboard false --overwrite_output_dir"
BUDGET="python3 benchmarks/loop_budget.py --model_path $MODEL --dataset_dir $DATA --max_steps ${STEPS:-5} --save_steps 0 --plot false --tensorboard false --overwrite_output_dir"
LOOP="env NUM_GPUS=1 MODEL_PATH=$MODEL DATASET_DIR=$DATA bash launch.sh --max_steps ${STEPS:-3} --save_steps 0 --plot false --tensorboard false --overwrite_output_dir"
declare -A V=(
  [data]="python3 benchmarks/write_random_checkpoint.py --out $MODEL ${TOKENIZER:+--tokenizer $TOKENIZER} && python3 -m chatts_train.cli make-data --out $DATA --scale 0.25"
  # the memory model's calibration: each plan kind at 1,600 and 4,096 positions (14B from config, 1 GPU)
  [probe_zero2_k0]="$PROBE --zero-stage 2 --recompute-layers 0 --compile-layers false"
  [probe_zero2_k24]="$PROBE --zero-stage 2 --recompute-layers 24 --compile-layers false"
  [probe_zero2_k48]="$PROBE --zero-stage 2 --recompute-layers 48 --compile-layers false"
  [probe_zero2_k48_host]="$PROBE --zero-stage 2 --recompute-layers 48 --checkpoints-on-cpu --compile-layers false"
  # compiled layers (ZeRO-2's default on a GPU with Triton), on the 14B folder; --profile: the micro-step's GPU idle
  [probe_compiled_k0]="$PROBE --model $MODEL --zero-stage 2 --recompute-layers 0 --compile-layers true --profile $OUT/prof_compiled_k0"
  [probe_compiled_k24]="$PROBE --model $MODEL --zero-stage 2 --recompute-layers 24 --compile-layers true"
  [probe_compiled_k48]="$PROBE --model $MODEL --zero-stage 2 --recompute-layers 48 --compile-layers true"
  [probe_eager_k0]="$PROBE --model $MODEL --zero-stage 2 --recompute-layers 0 --compile-layers false --profile $OUT/prof_eager_k0"
  [probe_offload_layers_k0]="$PROBE --offload param --whole-layers --recompute-layers 0"
  [probe_offload_layers_k48]="$PROBE --offload param --whole-layers --recompute-layers 48"
  [probe_offload_linear_k48]="$PROBE --offload param --per-linear --recompute-layers 48"
  # the peers: the plain PEFT recipe (no DeepSpeed), and the usual ZeRO-3 recipe beside our choice in one run
  [plain_peft]="python3 benchmarks/plain_peft.py --seq-len 1600,4096"
  [plain_peft_no_ckpt]="python3 benchmarks/plain_peft.py --seq-len 1600,4096 --no-checkpointing"
  [usual_vs_auto]="$PROBE --baseline hf"
  # the real loop on the 14B folder: the plan the job chooses, uncapped and as a 48 / 24 GiB card
  [loop_auto]="$LOOP --output_dir $W/loop_auto"
  [loop_auto_cap48]="$LOOP --output_dir $W/loop_auto_cap48 --gpu_memory_cap_gib 48"
  [loop_auto_cap24]="$LOOP --output_dir $W/loop_auto_cap24 --gpu_memory_cap_gib 24"
  [loop_reference]="$LOOP --output_dir $W/loop_reference --plan reference"
  # the loop's budget of one optimizer step (loop_budget.py): the plan the job chooses, and the same op by op
  [budget_auto]="$BUDGET --output_dir $W/budget_auto"
  [budget_eager]="$BUDGET --output_dir $W/budget_eager --compile_layers false"
  # by hand, beside the choices under the caps
  [loop_cap48_eager]="$LOOP --output_dir $W/loop_cap48_eager --gpu_memory_cap_gib 48 --compile_layers false"
  [loop_cap48_zero2_k24]="$LOOP --output_dir $W/loop_cap48_zero2_k24 --gpu_memory_cap_gib 48 --zero_stage 2 --recompute_layers 24"
  [loop_cap24_offload_layers_k48]="$LOOP --output_dir $W/loop_cap24_offload_layers_k48 --gpu_memory_cap_gib 24 --offload param --gather_whole_layers true --recompute_layers 48"
  [loop_cap24_offload_linear_k48]="$LOOP --output_dir $W/loop_cap24_offload_linear_k48 --gpu_memory_cap_gib 24 --plan reference --offload param"
  # two GPUs (issue 19; nvidia-h200-x2): the users' box as 2 x 22 GiB, then uncapped
  [x2_loop_auto_cap22]="$LOOP2 --output_dir $W/x2_loop_auto_cap22 --gpu_memory_cap_gib 22"
  [x2_loop_reference_cap22]="$LOOP2 --output_dir $W/x2_loop_reference_cap22 --gpu_memory_cap_gib 22 --plan reference"
  [x2_loop_auto_cap22_packed]="$LOOP2 --output_dir $W/x2_loop_auto_cap22_packed --gpu_memory_cap_gib 22 --packing"
  [x2_loop_auto]="$LOOP2 --output_dir $W/x2_loop_auto"
  [x2_probe_auto_cap22]="python3 benchmarks/memprobe.py --num-gpus 2 --gpu-mem-gb 22 --seq-len 4096 --also-seq-len 2158 --baseline hf --json"
  [x2_probe_auto_cap22_profile]="python3 benchmarks/memprobe.py --num-gpus 2 --gpu-mem-gb 22 --seq-len 2158 --profile $OUT/prof --json"
)
if [ "${1:-}" = "--list" ]; then for k in "${!V[@]}"; do echo "$k: ${V[$k]}"; done | sort; exit 0; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u; } > "$OUT/logs/machine.txt" 2>&1
for name in "$@"; do
  cmd=${V[$name]:-}
  [ -n "$cmd" ] || { echo "unknown variant $name (--list)"; continue; }
  echo "[$(date +%T)] $name: $cmd"
  t0=$(date +%s)
  timeout "${VARIANT_TIMEOUT:-420}" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  python3 benchmarks/variant_result.py "$name" "$rc" "$(( $(date +%s) - t0 ))" "$cmd" "$OUT/logs/$name.log" \
    "$W/${name}" >> "$OUT/results.jsonl"
  tail -1 "$OUT/results.jsonl" | cut -c1-400
done
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
