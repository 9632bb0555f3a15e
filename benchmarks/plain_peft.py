"""The plain recipe a one-GPU user runs instead of DeepSpeed, as the peer of the job's plans:

    python benchmarks/plain_peft.py --seq-len 1600,4096 [--no-checkpointing] [--steps 2 --grad-accum 4]

ChatTS-14B built from config on the GPU in fp16 (random values; memprobe's shape and synthetic sample),
transformers' forward with labels (full-vocabulary logits), PEFT LoRA r8 on q/k/v, reentrant gradient
checkpointing with enable_input_require_grads (or none), torch.amp fp16 autocast with GradScaler, AdamW on
the LoRA weights. Prints one JSON line per length: median micro-step time (first optimizer step left out),
tokens/s, peak allocated and reserved GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", default="1600,4096")
    p.add_argument("--release", default="0801")
    p.add_argument("--config", default=None)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.modeling_utils import no_init_weights

    from chatts_train.model.batching import collate
    from chatts_train.fit.loading import default_dtype, fill_random
    from chatts_train.model.modeling import ChatTSForCausalLM
    from instruments import GiB, steady_median
    from memprobe import probe_batch, shape_config

    config = shape_config(argparse.Namespace(shape_config=a.config, release=a.release))
    config._attn_implementation = "sdpa"
    with no_init_weights(), torch.device("cuda"), default_dtype(torch.float16):
        model = ChatTSForCausalLM(config)
    fill_random(model)
    model.full_vocabulary_loss = True  # transformers' own loss over [seq x vocab] logits
    if not a.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    lora = [q for q in model.parameters() if q.requires_grad]
    for q in lora:
        q.data = q.data.float()  # GradScaler unscales fp32 gradients only
    opt = torch.optim.AdamW(lora, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    model.train()
    for n in (int(x) for x in a.seq_len.split(",")):
        batch = collate([probe_batch(n, config.ts_spec, config.vocab_size)], config.pad_token_id)
        # what the official processor hands a user: an attention mask, no positions found on the host
        batch = {k: v.cuda() for k, v in {"attention_mask": torch.ones_like(batch["input_ids"]), **batch}.items()
                 if k not in ("ts_index", "answer_index")}
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(a.steps * a.grad_accum):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(**batch).loss / a.grad_accum
            scaler.scale(loss).backward()
            if (i + 1) % a.grad_accum == 0:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step = steady_median(times, a.grad_accum)
        print(json.dumps({"recipe": "plain_peft", "checkpointing": not a.no_checkpointing, "seq_len": n,
                          "micro_step_s": round(step, 4), "tokens_per_s": round(n / step, 1),
                          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
                          "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2),
                          "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
    main()
