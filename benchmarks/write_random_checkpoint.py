"""Write a random-weight ChatTS checkpoint folder in the published layout, fast: the fp16 tensors are drawn
on the GPU, one shard (~5 GB for 14B) at a time in host memory.

    python benchmarks/write_random_checkpoint.py --out /tmp/ChatTS-14B --tokenizer TOKENIZER_DIR

Same config.json, state-dict keys, shapes and dtype as the published ChatTS-14B (0801 or legacy), 6 shards
plus model.safetensors.index.json, generation config and tokenizer files. Values are N(0, 0.02) (norms 1):
right for memory, speed and host-RAM measurements, meaningless as a model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from chatts_train.model.modeling import ChatTSConfig, ChatTSForCausalLM
    from chatts_train.model.published import chatts_config
    from chatts_train.standins.checkpoint import write_checkpoint_files

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--release", choices=["0801", "legacy"], default="0801")
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--tokenizer", default=None, help="folder to copy tokenizer files from (default: the stand-in)")
    a = p.parse_args()

    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    cfg = chatts_config(a.release)
    with torch.device("meta"):  # shapes and names only, no memory
        model = ChatTSForCausalLM(ChatTSConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, shard, shard_bytes, k = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, k
        k += 1
        name = f"model-{k:05d}-of-{a.shards:05d}.safetensors"
        save_file(shard, os.path.join(a.out, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        print(f"[write] {name}: {shard_bytes / 1e9:.2f} GB ({time.time() - t0:.0f} s)", flush=True)
        shard, shard_bytes = {}, 0

    for n, s in shapes.items():
        t = torch.empty(s, dtype=torch.float16, device=device)
        t.fill_(1.0) if n.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=gen)
        shard[n] = t.cpu()
        shard_bytes += t.numel() * 2
        if shard_bytes >= total / a.shards and k < a.shards - 1:
            flush()
    flush()
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    write_checkpoint_files(a.out, cfg, a.tokenizer)
    print(f"[write] {a.out}: {len(shapes)} tensors, {total / 1e9:.1f} GB in {k} shards, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
