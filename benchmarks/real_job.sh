#!/usr/bin/env bash
# The users' job at full size on a GPU machine, measured by the job itself and by memprobe side by side:
# a random-weight ChatTS-14B folder in the published layout (tensors drawn on the GPU), data of the users'
# shape (make-data --scale 0.25: 5000-point series, 723-2,158 positions a sample), then `bash launch.sh`
# for $STEPS optimizer steps (GA 8 x 2 GPUs) without offload and with parameter offload, each process
# capped to $CAP GiB; after each run, memprobe on the same folder at the run's longest sequence, and the
# two compared (loop_vs_probe.py). Also the host RAM of loading: our loader against transformers'.
#   [PHASES="write none param rss"] [EXTRA="--packing"] [PROBE_EXTRA="--checkpoints-on-cpu"] [TAG=_packed]
#   bash benchmarks/real_job.sh     (EXTRA: launch.sh's options; PROBE_EXTRA: memprobe's same options)
#   (GPU machine, wheels installed, PATH/PYTHONPATH set)
# Results in $OUT (at most 8 files): real_job.log, launch_<offload><TAG>.log, metrics_<offload><TAG>.jsonl,
# probe_<offload><TAG>.json, probes.err.
set -uo pipefail
OUT=${OUT:-runs/real_job}; W=${WORK:-runs/real}; STEPS=${STEPS:-3}; CAP=${CAP:-22}; TAG=${TAG:-}
mkdir -p "$OUT" "$W"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/real_job.log"; }
MODEL=$W/ChatTS-14B

for phase in ${PHASES:-write none param rss}; do
  case $phase in
  write)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/real_job.log"
    python3 -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/real_job.log"
    [ -f "$MODEL/config.json" ] || python3 benchmarks/write_random_checkpoint.py --out "$MODEL" ${TOKENIZER:+--tokenizer "$TOKENIZER"} 2>&1 | grep "^\[write\]" | tee -a "$OUT/real_job.log"
    [ -f "$W/data/dataset_info.json" ] || python3 -m chatts_train.cli make-data --out "$W/data" --scale 0.25 >> "$OUT/real_job.log" 2>&1
    ;;
  none|param)
    log "MODEL_PATH=$MODEL DATASET_DIR=$W/data OUTPUT=$W/run_$phase$TAG bash launch.sh --offload $phase --max_steps $STEPS --gpu_memory_cap_gib $CAP --save_steps 0 --plot false --tensorboard false ${EXTRA:-}"
    rm -rf "$W/run_$phase$TAG"
    MODEL_PATH=$MODEL DATASET_DIR=$W/data OUTPUT=$W/run_$phase$TAG timeout 240 bash launch.sh --offload "$phase" \
      --max_steps "$STEPS" --gpu_memory_cap_gib "$CAP" --save_steps 0 --plot false --tensorboard false ${EXTRA:-} \
      > "$OUT/launch_$phase$TAG.log" 2>&1
    log "launch.sh rc $?"
    grep -E "^\[(data|host|model)\]|^error|run summary" "$OUT/launch_$phase$TAG.log" | tee -a "$OUT/real_job.log"
    cp "$W/run_$phase$TAG/metrics.jsonl" "$OUT/metrics_$phase$TAG.jsonl" 2>/dev/null
    L=$(python3 -c "import json; print(max(json.loads(l)['max_seq_len'] for l in open('$W/run_$phase$TAG/metrics.jsonl')))") || continue
    log "python3 benchmarks/memprobe.py --model $MODEL --offload $phase --seq-len $L --gpu-mem-gb $CAP ${PROBE_EXTRA:-} --json"
    timeout 200 python3 benchmarks/memprobe.py --model "$MODEL" --offload "$phase" --seq-len "$L" --gpu-mem-gb "$CAP" \
      ${PROBE_EXTRA:-} --json > "$OUT/probe_$phase$TAG.json" 2>> "$OUT/probes.err"
    python3 benchmarks/loop_vs_probe.py "$W/run_$phase$TAG" "$OUT/probe_$phase$TAG.json" | tee -a "$OUT/real_job.log"
    ;;
  rss)
    for loader in ${LOADERS:-ours transformers}; do
      log "torchrun --nproc_per_node 2 benchmarks/load_rss.py --model $MODEL --loader $loader --offload param"
      timeout 240 python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29650 benchmarks/load_rss.py \
        --model "$MODEL" --loader $loader --offload param 2>> "$OUT/probes.err" | grep '^{' | tee -a "$OUT/real_job.log"
    done
    ;;
  esac
done
log "done"
