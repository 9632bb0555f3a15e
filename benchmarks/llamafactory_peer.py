"""LLaMA-Factory as ChatTS-Training's users run it, beside the loop: its own CLI (`llamafactory-cli train
FILE.yaml`) on the same checkpoint folder and the same sample lengths as the loop's runs.

    python benchmarks/llamafactory_peer.py --row plain|liger|zero3 --model_path DIR --dataset_dir DIR [--max_steps 5]

Text only (the peer has no time-series encoder outside ChatTS's fork): the checkpoint folder is seen as the
Qwen2.5-14B it holds (config.json says qwen2; the weights are the same files, linked), and every sample of
--data becomes a text whose length under LLaMA-Factory's `qwen` template equals that sample's positions in the
loop (text and series patches), with as many answer tokens. The YAML is the user's plan: LoRA r8 on q/k/v,
micro-batch 1, accumulation 8, lr 1e-4, cutoff 4,096, fp16, checkpointing and SDPA (LLaMA-Factory's defaults).
Rows: `plain`; `liger` (`enable_liger_kernel: true`); `zero3` (ChatTS-Training's ds_config/ds_config_3.json,
written out below, through torchrun as LLaMA-Factory requires for DeepSpeed).

Counted as the loop counts: positions without pads (`include_num_input_tokens_seen: non_padding`), the first
optimizer step left out; the time of each step is LLaMA-Factory's own (trainer_log.jsonl: tokens seen over its
throughput). Prints one JSON line: tokens/s, seconds per optimizer step, peak allocated GiB (`RECORD_VRAM`).

Needs LLaMA-Factory 0.9.5 and what it imports (benchmarks/peer_wheels.sh). With DeepSpeed 0.18.1 under torch
>= 2.11 the zero3 row's first step fails in the LR scheduler (DeepSpeed drops the empty no-decay parameter group
after the scheduler was built; torch 2.6 does not raise): the row then drops that empty group before the
scheduler is built, and its JSON line says so (`patched`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# ChatTS-Training's ds_config/ds_config_3.json (its "auto" values filled in by transformers' Trainer)
CHATTS_TRAINING_ZERO3 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 3, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                          "reduce_scatter": True, "reduce_bucket_size": 5e8, "overlap_comm": False,
                          "contiguous_gradients": True, "stage3_gather_16bit_weights_on_model_save": True},
}
# Loaded by every process of the zero3 row where torch >= 2.11 (see above); Trainer.create_optimizer is what
# LLaMA-Factory's trainer calls, before DeepSpeed and before the scheduler.
DROP_EMPTY_GROUPS = """import transformers
_create = transformers.Trainer.create_optimizer
def _create_optimizer(self):
    optimizer = _create(self)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    return optimizer
transformers.Trainer.create_optimizer = _create_optimizer
"""
NOT_QWEN2 = ("auto_map", "ts", "ts_token_start_index", "ts_token_end_index", "ignore_index")


def text_view(model_path: str, out: str) -> str:
    """The checkpoint folder as the Qwen2 model it holds: config.json rewritten, every other file linked
    (the encoder's weights stay in the shards, unused)."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(model_path):
        dst = os.path.join(out, name)
        if name != "config.json" and not os.path.lexists(dst):
            os.symlink(os.path.abspath(os.path.join(model_path, name)), dst)
    with open(os.path.join(model_path, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if k not in NOT_QWEN2}
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out


def loop_lengths(model_path: str, data: str, dataset_dir: str, cutoff: int) -> list[tuple[int, int]]:
    """(positions, answer tokens) of each sample as the loop indexes it."""
    from chatts_train.data.indexing import index_data, resolve_sources
    from chatts_train.model.processor import ChatTSProcessor

    index = index_data(resolve_sources(data, dataset_dir), ChatTSProcessor.from_pretrained(model_path), cutoff)
    return list(zip(index.length.tolist(), index.answer_tokens.tolist()))


def peer_samples(tokenizer, lengths: list[tuple[int, int]], word: str = " hello") -> list[dict]:
    """Alpaca rows whose encoding under LLaMA-Factory's qwen template has each sample's length and answer size."""
    from llamafactory.data.template import TEMPLATES

    template = TEMPLATES["qwen"]

    def encoded(k_prompt: int, k_answer: int) -> int:
        prompt, response = template.encode_oneturn(tokenizer, [{"role": "user", "content": word * k_prompt},
                                                               {"role": "assistant", "content": word * k_answer}])
        return len(prompt) + len(response)

    overhead = encoded(1, 1) - 2  # the template's own tokens
    rows = []
    for length, answer in lengths:
        k_answer = max(answer - 2, 1)  # the answer's <|im_end|> and newline are the template's
        k_prompt = length - overhead - k_answer
        got = encoded(k_prompt, k_answer)
        if got != length:
            raise RuntimeError(f"a {length}-position sample encodes to {got} tokens under the qwen template")
        rows.append({"instruction": word * k_prompt, "input": "", "output": word * k_answer})
    return rows


def write_yaml(path: str, model: str, data_dir: str, out: str, row: str, max_steps: int, cutoff: int,
               fp16: bool, ds_file: str) -> None:
    options = {
        "model_name_or_path": model, "trust_remote_code": True, "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_rank": 8, "lora_target": "q_proj,k_proj,v_proj",
        "dataset": "peer", "dataset_dir": data_dir, "template": "qwen", "cutoff_len": cutoff,
        "overwrite_cache": True, "preprocessing_num_workers": 4, "output_dir": out, "overwrite_output_dir": True,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "plot_loss": False,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
        "num_train_epochs": 3.0, "max_steps": max_steps, "lr_scheduler_type": "cosine", "warmup_ratio": 0.02,
        "fp16": fp16, "include_num_input_tokens_seen": "non_padding",
    }
    if row == "liger":
        options["enable_liger_kernel"] = True
    if row == "zero3":
        options["deepspeed"] = ds_file
    with open(path, "w") as f:
        f.writelines(f"{k}: {json.dumps(v)}\n" for k, v in options.items())


def steady_rate(log_rows: list[dict]) -> tuple[float, float]:
    """(tokens/s, s per optimizer step) from step 2 on: each logged step's time is its tokens over its throughput."""
    steps = {r["current_steps"]: r for r in reversed(log_rows) if r.get("total_tokens") and r.get("throughput")}
    rows = [steps[k] for k in sorted(steps)]  # the first row of each step (the run's end logs its last step again)
    if len(rows) < 2:
        raise RuntimeError(f"LLaMA-Factory logged {len(rows)} steps with throughput; 2 or more are needed")
    t = [r["total_tokens"] / r["throughput"] for r in rows]
    tokens = rows[-1]["total_tokens"] - rows[0]["total_tokens"]
    return tokens / (t[-1] - t[0]), (t[-1] - t[0]) / (rows[-1]["current_steps"] - rows[0]["current_steps"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", choices=["plain", "liger", "zero3"], required=True)
    p.add_argument("--model_path", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--data", default="gdsh,hbsn,whlj,zhlh")
    p.add_argument("--max_steps", type=int, default=5)
    p.add_argument("--cutoff_len", type=int, default=4096)
    p.add_argument("--work", default="/tmp/llamafactory-peer")
    p.add_argument("--fp32", action="store_true", help="no fp16 (a CPU rehearsal of the pipeline)")
    a = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    import llamafactory

    model = text_view(a.model_path, os.path.join(a.work, "model"))
    data_dir = os.path.join(a.work, "data")
    os.makedirs(data_dir, exist_ok=True)
    lengths = loop_lengths(a.model_path, a.data, a.dataset_dir, a.cutoff_len)
    with open(os.path.join(data_dir, "peer.json"), "w") as f:
        json.dump(peer_samples(AutoTokenizer.from_pretrained(model), lengths), f)
    with open(os.path.join(data_dir, "dataset_info.json"), "w") as f:
        json.dump({"peer": {"file_name": "peer.json"}}, f)

    run_dir = os.path.join(a.work, a.row)
    os.makedirs(run_dir, exist_ok=True)
    ds_file = os.path.join(a.work, "ds_config_3.json")
    with open(ds_file, "w") as f:
        json.dump(CHATTS_TRAINING_ZERO3, f, indent=2)
    yaml_path = os.path.join(run_dir, "peer.yaml")
    write_yaml(yaml_path, model, data_dir, os.path.join(run_dir, "out"), a.row, a.max_steps, a.cutoff_len,
               not a.fp32, ds_file)

    env = {**os.environ, "RECORD_VRAM": "1"}
    patched = a.row == "zero3" and tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 11)
    if a.row == "zero3":
        env["FORCE_TORCHRUN"] = "1"  # LLaMA-Factory refuses DeepSpeed outside torchrun
    if patched:
        patch_dir = os.path.join(a.work, "patch")
        os.makedirs(patch_dir, exist_ok=True)
        with open(os.path.join(patch_dir, "sitecustomize.py"), "w") as f:
            f.write(DROP_EMPTY_GROUPS)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [patch_dir, env.get("PYTHONPATH")]))
        print(f"[peer] torch {torch.__version__} with DeepSpeed: the empty no-decay parameter group is dropped "
              f"before the scheduler is built (see this file's docstring)", flush=True)
    t0 = time.time()
    rc = subprocess.call(["llamafactory-cli", "train", yaml_path], env=env)
    wall = time.time() - t0
    log_path = os.path.join(run_dir, "out", "trainer_log.jsonl")
    log_rows = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    if rc != 0 or not log_rows:
        sys.exit(f"[peer] llamafactory-cli exited with {rc} after {wall:.0f} s ({len(log_rows)} steps logged)")
    tokens_per_s, step_s = steady_rate(log_rows)
    print(json.dumps({
        "recipe": "llamafactory", "row": a.row, "llamafactory": llamafactory.__version__, "patched": patched,
        "steps": max(r["current_steps"] for r in log_rows), "tokens_per_s": round(tokens_per_s, 1), "optimizer_step_s": round(step_s, 3),
        "peak_allocated_gib": max((r.get("vram_allocated", 0.0) for r in log_rows), default=None),
        "mean_positions": round(sum(n for n, _ in lengths) / len(lengths), 1), "samples": len(lengths),
        "wall_s": round(wall, 1), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
    main()
