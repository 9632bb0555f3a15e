#!/usr/bin/env bash
# The one runner of GPU measurements: a table of named variants, each a command with its environment. Every
# variant appends one JSON line to $OUT/results.jsonl (the variant, its command, rc, wall time and what it
# measured: memprobe's report, plain_peft.py's lines, or the loop's metrics rows, [plan] line, setup.json and
# budget.json) and its log to $OUT/logs/<name>.log (packed into $OUT/logs.tgz at the end); file the lines into
# benchmarks/results/ with benchmarks/file_results.py.
#   bash benchmarks/gpu_variants.sh NAME...      (GPU machine, wheels installed, PATH/PYTHONPATH set)
#   bash benchmarks/gpu_variants.sh --list
# `data` writes the random-weight 14B folder (benchmarks/write_random_checkpoint.py; kept if there) and data of the
# users' shape (make-data --scale 0.25: 105 samples, 723-2,158 positions; --scale 1 for job_*); the variants on
# $MODEL need it first.
# x2_* variants need two GPUs. The runs of benchmarks/HISTORY.md's rounds (2 GPUs, the stand-in models, the
# loop-then-probe comparisons) left this table with the scripts they used at b9e11f5 (HISTORY.md says which).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}; W=${WORK:-/tmp/chatts-real}; mkdir -p "$OUT/logs" "$W"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OUT W
MODEL=$W/ChatTS-14B; DATA=$W/data
# TREE=DIR: the loop and job variants run DIR's launch.sh, so DIR's package (an A/B of two commits: `git archive
# COMMIT | tar -x -C DIR`). A package ahead on PYTHONPATH does not reach the ranks: launch.sh's `python -m` puts its
# own directory first on sys.path.
TREE=${TREE:-.}
PROBE="python3 benchmarks/memprobe.py --num_gpus 1 --seq_len 4096 --also_seq_len 1600 --json"
LOOP2="env NUM_GPUS=2 MODEL_PATH=$MODEL DATASET_DIR=$DATA bash $TREE/launch.sh --max_steps ${STEPS:-3} --save_steps 0 --plot false --tensorboard false --overwrite_output_dir"
BUDGET="python3 benchmarks/loop_budget.py --model_path $MODEL --dataset_dir $DATA --max_steps ${STEPS:-5} --save_steps 0 --plot false --tensorboard false --overwrite_output_dir"
AB="python3 benchmarks/micro_step_ab.py --model_path $MODEL --dataset_dir $DATA --plot false --tensorboard false --overwrite_output_dir"
LOOP="env NUM_GPUS=1 MODEL_PATH=$MODEL DATASET_DIR=$DATA bash $TREE/launch.sh --max_steps ${STEPS:-3} --save_steps 0 --plot false --tensorboard false --overwrite_output_dir"
# LLaMA-Factory's wheels (benchmarks/peer_wheels.sh) go ahead of the pinned ones: it needs peft >= 0.18
LF="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf .whl/llamafactory/*.whl && env PYTHONPATH=/tmp/lf:${PYTHONPATH:-} PATH=/tmp/lf/bin:$PATH python3 benchmarks/llamafactory_peer.py --model_path $MODEL --dataset_dir $DATA --work $W/lf"

declare -A V=(
  [data]="{ [ -f $MODEL/model.safetensors.index.json ] || python3 benchmarks/write_random_checkpoint.py --out $MODEL ${TOKENIZER:+--tokenizer $TOKENIZER}; } && python3 -m chatts_train.cli make-data --out $DATA --scale 0.25 && python3 -m chatts_train.cli make-data --out $W/data_full --scale 1"
  # the memory model's calibration: each plan kind at 1,600 and 4,096 positions (14B from config, 1 GPU)
  [probe_zero2_k0]="$PROBE --zero_stage 2 --recompute_layers 0 --compile_layers false"
  [probe_zero2_k24]="$PROBE --zero_stage 2 --recompute_layers 24 --compile_layers false"
  [probe_zero2_k48]="$PROBE --zero_stage 2 --recompute_layers 48 --compile_layers false"
  [probe_zero2_k48_host]="$PROBE --zero_stage 2 --recompute_layers 48 --checkpoints_on_cpu true --compile_layers false"
  # compiled layers on the 14B folder, pinned to ZeRO-2 as measured before e11a0dc; --profile: the micro-step's GPU idle
  [probe_compiled_k0]="$PROBE --model_path $MODEL --zero_stage 2 --recompute_layers 0 --compile_layers true --profile $OUT/prof_compiled_k0"
  # ZeRO-1 (what the plan picks with the base whole since it stopped weighing ZeRO-2): no gradient hooks
  [probe_compiled_k0_zero1]="$PROBE --model_path $MODEL --zero_stage 1 --recompute_layers 0 --compile_layers true --profile $OUT/prof_compiled_k0_zero1"
  [probe_compiled_k0_zero1_1410]="python3 benchmarks/memprobe.py --num_gpus 1 --seq_len 1410 --json --model_path $MODEL --zero_stage 1 --recompute_layers 0 --compile_layers true"  # the loop's mean micro-step
  [probe_compiled_k0_cudnn]="$PROBE --model_path $MODEL --zero_stage 2 --recompute_layers 0 --compile_layers true --sdpa_cudnn --profile $OUT/prof_compiled_k0_cudnn"
  [probe_compiled_k24]="$PROBE --model_path $MODEL --zero_stage 2 --recompute_layers 24 --compile_layers true"
  [probe_compiled_k48]="$PROBE --model_path $MODEL --zero_stage 2 --recompute_layers 48 --compile_layers true"
  [probe_eager_k0]="$PROBE --model_path $MODEL --zero_stage 2 --recompute_layers 0 --compile_layers false --profile $OUT/prof_eager_k0"
  # the offload plans the chooser picks under a 24 GiB cap, on the 14B folder (a config-only offload build is slow)
  [probe_model_offload_layers_k48]="$PROBE --model_path $MODEL --gpu_memory_cap_gib 24 --grad_accum 2 --offload param --gather_whole_layers true --recompute_layers 48"
  [probe_model_offload_layers_k48_host]="$PROBE --model_path $MODEL --gpu_memory_cap_gib 24 --grad_accum 2 --offload param --gather_whole_layers true --recompute_layers 48 --checkpoints_on_cpu true"
  [probe_model_offload_linear_k48]="$PROBE --model_path $MODEL --gpu_memory_cap_gib 24 --grad_accum 2 --offload param --gather_whole_layers false --recompute_layers 48"
  [probe_model_offload_linear_k48_host]="$PROBE --model_path $MODEL --gpu_memory_cap_gib 24 --grad_accum 2 --offload param --gather_whole_layers false --recompute_layers 48 --checkpoints_on_cpu true"
  [probe_offload_layers_k0]="$PROBE --offload param --gather_whole_layers true --recompute_layers 0"
  [probe_offload_layers_k48]="$PROBE --offload param --gather_whole_layers true --recompute_layers 48"
  [probe_offload_linear_k48]="$PROBE --offload param --gather_whole_layers false --recompute_layers 48"
  # the peers: the plain PEFT recipe (no DeepSpeed), and the usual ZeRO-3 recipe beside our choice in one run
  [plain_peft]="python3 benchmarks/plain_peft.py --seq-len 1600,4096"
  [plain_peft_no_ckpt]="python3 benchmarks/plain_peft.py --seq-len 1600,4096 --no-checkpointing"
  [usual_vs_auto]="$PROBE --baseline hf"
  # the peer as ChatTS-Training's users run it: LLaMA-Factory 0.9.5's CLI, plain, with Liger kernels, with
  # ChatTS-Training's ZeRO-3 file (benchmarks/llamafactory_peer.py; 5 / 5 / 4 optimizer steps, the first left out)
  [lf_plain]="$LF --row plain --max_steps 5"
  [lf_liger]="$LF --row liger --max_steps 5"
  [lf_zero3]="$LF --row zero3 --max_steps 4"
  # the users' whole job: launch.sh with no flags, 421 samples x 3 epochs (wall_s: launch to exit), then its first
  # step again on the same machine with Inductor's caches on disk (2 steps, the plan the job chose pinned)
  [job_users]="env NUM_GPUS=1 MODEL_PATH=$MODEL DATASET_DIR=$W/data_full OUTPUT=$W/job_users bash $TREE/launch.sh"
  [job_first_step]="env NUM_GPUS=1 MODEL_PATH=$MODEL DATASET_DIR=$W/data_full bash $TREE/launch.sh --output_dir $W/job_first_step --max_steps 2 --zero_stage 1 --recompute_layers 0 --compile_layers true --plot false --overwrite_output_dir"
  # the first step's compiling over Inductor's caches (compile_cache.py's tiny layers: their one graph compiles in
  # about the 14B layers' time): cold, warm, warm under cProfile; then warm with Inductor's compile workers answering
  # before compiling, and warm with one compile thread (RESULTS.md "A C++ kernel in a GPU graph")
  [compile_cache]="python3 benchmarks/compile_cache.py --device cuda --runs 3 --cache_dir $W/cc --profile $OUT/logs/compile_cache.profile.txt"
  [compile_cache_workers]="python3 benchmarks/compile_cache.py --device cuda --runs 1 --cache_dir $W/cc --start_workers 0"
  [compile_cache_one_thread]="env TORCHINDUCTOR_COMPILE_THREADS=1 python3 benchmarks/compile_cache.py --device cuda --runs 1 --cache_dir $W/cc"
  # the real loop on the 14B folder: the plan the job chooses, uncapped and as a 48 / 24 GiB card
  [loop_auto]="$LOOP --output_dir $W/loop_auto"
  [loop_compiled]="$LOOP --output_dir $W/loop_compiled --compile_layers true"
  [loop_compiled_zero2]="$LOOP --output_dir $W/loop_compiled_zero2 --compile_layers true --zero_stage 2"  # the plan before ZeRO-1
  # micro-batch 2 x accumulation 4 (right-padded pairs, no attention mask since 2e93d38): beside loop_compiled
  [loop_mb2_compiled]="$LOOP --output_dir $W/loop_mb2_compiled --compile_layers true --micro_batch 2 --grad_accum 4"
  [loop_auto_cap48]="$LOOP --output_dir $W/loop_auto_cap48 --gpu_memory_cap_gib 48"
  [loop_auto_cap24]="$LOOP --output_dir $W/loop_auto_cap24 --gpu_memory_cap_gib 24"
  [loop_reference]="$LOOP --output_dir $W/loop_reference --plan reference"
  # the loop's budget of one optimizer step (loop_budget.py): the plan the job chooses, and the same op by op
  # (at 3e7d902 the plan compiled every ZeRO-2 run: budget_auto and loop_auto then ran what budget_compiled and
  # loop_compiled pin now; since 5c9fe7b a run this short is left op by op)
  [budget_auto]="$BUDGET --output_dir $W/budget_auto"
  [budget_compiled]="$BUDGET --output_dir $W/budget_compiled --compile_layers true"
  [budget_compiled_zero2]="$BUDGET --output_dir $W/budget_compiled_zero2 --compile_layers true --zero_stage 2"
  [budget_eager]="$BUDGET --output_dir $W/budget_eager --compile_layers false"
  # a micro-step of the loop's engine by what it is fed (micro_step_ab.py): one sample repeated, new lengths, seen ones
  [ab_eager]="$AB --output_dir $W/ab_eager --compile_layers false && mkdir -p $OUT/logs/ab_eager && cp $W/ab_eager/*.txt $OUT/logs/ab_eager/"
  [ab_compiled]="$AB --output_dir $W/ab_compiled --compile_layers true && mkdir -p $OUT/logs/ab_compiled && cp $W/ab_compiled/*.txt $OUT/logs/ab_compiled/"
  # by hand, beside the choices under the caps
  [loop_cap48_eager]="$LOOP --output_dir $W/loop_cap48_eager --gpu_memory_cap_gib 48 --compile_layers false"
  [loop_cap48_compiled]="$LOOP --output_dir $W/loop_cap48_compiled --gpu_memory_cap_gib 48 --compile_layers true"
  [loop_cap48_zero2_k1_host]="$LOOP --output_dir $W/loop_cap48_zero2_k1_host --gpu_memory_cap_gib 48 --zero_stage 2 --recompute_layers 1 --checkpoints_on_cpu true"
  [loop_cap48_zero2_k24]="$LOOP --output_dir $W/loop_cap48_zero2_k24 --gpu_memory_cap_gib 48 --zero_stage 2 --recompute_layers 24"
  [loop_cap24_offload_layers_k48]="$LOOP --output_dir $W/loop_cap24_offload_layers_k48 --gpu_memory_cap_gib 24 --offload param --gather_whole_layers true --recompute_layers 48"
  [loop_cap24_offload_linear_k48]="$LOOP --output_dir $W/loop_cap24_offload_linear_k48 --gpu_memory_cap_gib 24 --plan reference --offload param"
  # the users' cards played by the H200 (--card 2080ti: no flash or cuDNN SDPA, fp16, no compiled kernels, 21.4 GiB cap):
  # one rank of their 2-GPU plan (fake collectives), the same plan with flash on and the same kernels otherwise, the loop
  [turing_x2_probe]="python3 benchmarks/memprobe.py --num_gpus 2 --emulate_world 2 --model_path $MODEL --card 2080ti --seq_len 4096 --also_seq_len 2158 --json"
  [turing_x2_probe_flash]="python3 benchmarks/memprobe.py --num_gpus 2 --emulate_world 2 --model_path $MODEL --gpu_memory_cap_gib 21.4 --zero_stage 3 --gather_whole_layers true --recompute_layers 47 --fused_kernels false --seq_len 4096 --also_seq_len 2158 --json"
  [turing_loop]="$LOOP --output_dir $W/turing_loop --card 2080ti"
  # the same two from config at 2,158 positions first (then 4,096), one micro-step profiled: where the time goes
  [turing_x2_probe_2158]="python3 benchmarks/memprobe.py --num_gpus 2 --emulate_world 2 --card 2080ti --zero_stage 3 --gather_whole_layers true --recompute_layers 47 --seq_len 2158 --also_seq_len 4096 --steps 3 --profile $OUT/prof_turing --json"
  [turing_x2_probe_flash_2158]="python3 benchmarks/memprobe.py --num_gpus 2 --emulate_world 2 --gpu_memory_cap_gib 21.4 --zero_stage 3 --gather_whole_layers true --recompute_layers 47 --fused_kernels false --seq_len 2158 --also_seq_len 4096 --steps 3 --profile $OUT/prof_flash --json"
  # two GPUs (issue 19; nvidia-h200-x2): the users' box as 2 x 22 GiB, then uncapped
  [x2_loop_auto_cap22]="$LOOP2 --output_dir $W/x2_loop_auto_cap22 --gpu_memory_cap_gib 22"
  [x2_loop_reference_cap22]="$LOOP2 --output_dir $W/x2_loop_reference_cap22 --gpu_memory_cap_gib 22 --plan reference"
  [x2_loop_auto_cap22_packed]="$LOOP2 --output_dir $W/x2_loop_auto_cap22_packed --gpu_memory_cap_gib 22 --packing"
  [x2_loop_auto]="$LOOP2 --output_dir $W/x2_loop_auto"
  [x2_probe_auto_cap22]="python3 benchmarks/memprobe.py --num_gpus 2 --gpu_memory_cap_gib 22 --seq_len 4096 --also_seq_len 2158 --baseline hf --json"
  [x2_probe_auto_cap22_profile]="python3 benchmarks/memprobe.py --num_gpus 2 --gpu_memory_cap_gib 22 --seq_len 2158 --profile $OUT/prof --json"
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
