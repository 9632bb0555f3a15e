#!/usr/bin/env bash
# The training loop for real on a 2-GPU machine (fp16, ZeRO-3, with and without parameter offload), on the
# tiny model and on a 1.5 B ChatTS shape at up to 4096 tokens, plus the fp16 loss-scaling scenario on GPU.
# Results: $OUT/loop_results.jsonl (one JSON per run) and $OUT/loop_log.txt.
#   [RUNS="name ..."] bash benchmarks/gpu_loop_runs.sh   (on the GPU machine, wheels installed, PYTHONPATH set)
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"; W=/tmp/chatts-gpu; mkdir -p $W
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/loop_log.txt"; }
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/loop_log.txt"
python3 -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/loop_log.txt"

python3 - <<'PY' 2>&1 | tee -a "$OUT/loop_log.txt"
from chatts_train.standins.checkpoint import make_tiny_checkpoint
from chatts_train.standins.synthetic import write_datasets
import time
t = time.time()
make_tiny_checkpoint("/tmp/chatts-gpu/tiny", "0801")
write_datasets("/tmp/chatts-gpu/data", {"gdsh": 28, "hbsn": 24, "whlj": 27, "zhlh": 26}, 5000)
# 1.5 B parameters in the ChatTS layout (Qwen2.5-1.5B sizes), random weights
make_tiny_checkpoint("/tmp/chatts-gpu/mid", "0801", num_shards=4, hidden_size=1536, intermediate_size=8960,
                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_window_layers=28)
write_datasets("/tmp/chatts-gpu/data_long", {"gdsh": 12, "hbsn": 12, "whlj": 12, "zhlh": 12}, 10000)
print("stand-ins ready in", round(time.time() - t, 1), "s")
PY

run_loop() {  # name model data extra-args...
  local name=$1 model=$2 data=$3; shift 3
  log "loop $name: $*"
  local t0=$(date +%s)
  deepspeed --num_gpus 2 --master_port 29600 --module chatts_train.loop --model_path "$model" \
    --data gdsh,hbsn,whlj,zhlh --dataset_dir "$data" --output_dir "$W/$name" --ds_config ds_config.json \
    --fp16 true --plot false --save_steps 0 "$@" > "$W/$name.log" 2>&1
  local rc=$?
  grep -E "^\[(data|model)\]|Error|error|summary" "$W/$name.log" | tail -12 >> "$OUT/loop_log.txt"
  python3 - "$name" "$rc" "$W/$name" "$(( $(date +%s) - t0 ))" "$*" <<'PY' >> "$OUT/loop_results.jsonl"
import json, os, sys
name, rc, d, wall, args = sys.argv[1:]
rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] if os.path.exists(os.path.join(d, "metrics.jsonl")) else []
summ = json.load(open(os.path.join(d, "summary.json"))) if os.path.exists(os.path.join(d, "summary.json")) else None
print(json.dumps({"run": name, "rc": int(rc), "launch_wall_s": int(wall), "args": args, "summary": summ,
                  "samples_per_s": round(summ["samples"] / sum(r["step_time_s"] for r in rows), 3) if summ and rows else None,
                  "rows": [{k: r[k] for k in ("step", "loss", "loss_scale", "skipped", "grad_norm", "tokens_per_s_per_gpu", "step_time_s", "peak_allocated_gib", "peak_reserved_gib")} for r in rows]}))
PY
  tail -3 "$W/$name.log" | tee -a "$OUT/loop_log.txt"
}

declare -A R=(
  [tiny_no_offload]="/tmp/chatts-gpu/tiny /tmp/chatts-gpu/data --offload none --max_steps 6 --learning_rate 5e-3"
  [tiny_param_offload]="/tmp/chatts-gpu/tiny /tmp/chatts-gpu/data --offload param --max_steps 6 --learning_rate 5e-3"
  [mid_no_offload]="/tmp/chatts-gpu/mid /tmp/chatts-gpu/data_long --offload none --max_steps 3 --cutoff_len 4096"
  [mid_param_offload]="/tmp/chatts-gpu/mid /tmp/chatts-gpu/data_long --offload param --max_steps 3 --cutoff_len 4096"
  # the users' lengths (5000-point series, ~700-2,150 positions a sample), one by one vs packed to 4096
  [mid_users_unpacked]="/tmp/chatts-gpu/mid /tmp/chatts-gpu/data --offload none --max_steps 3 --cutoff_len 4096"
  [mid_users_packed]="/tmp/chatts-gpu/mid /tmp/chatts-gpu/data --offload none --max_steps 3 --cutoff_len 4096 --packing"
)
for name in ${RUNS:-tiny_no_offload tiny_param_offload mid_no_offload mid_param_offload fp16_scenario}; do
  [ "$name" = fp16_scenario ] && continue
  run_loop "$name" ${R[$name]}
done
[[ " ${RUNS:-fp16_scenario} " == *" fp16_scenario "* ]] || { log "done"; exit 0; }

log "fp16 loss-scaling scenario on GPU (tests/dist_scenarios.py fp16_loss_scaling)"
python3 -c "from chatts_train.standins.synthetic import write_series_task; write_series_task('$W/task.jsonl', 48, 120, 0)"
python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29601 tests/dist_scenarios.py "$W" /tmp/chatts-gpu/tiny fp16_loss_scaling > "$W/fp16.log" 2>&1
python3 - "$W/results.json" <<'PY' >> "$OUT/loop_results.jsonl"
import json, sys
r = json.load(open(sys.argv[1]))["fp16_loss_scaling"]
print(json.dumps({"run": "fp16_scenario", "error": r.get("error"), "rows": [{k: x[k] for k in ("step", "loss", "loss_scale", "skipped")} for x in r.get("rows", [])], "min_scale": r.get("min_scale"), "nan": r.get("nan")}))
PY
log "done"
