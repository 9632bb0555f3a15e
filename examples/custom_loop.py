"""A custom training loop from chatts_train's pieces: the same set-up as `train()`, plus its own
evaluation (held-out answer-token loss) every `--eval_every` optimizer steps.

    deepspeed --num_gpus 2 examples/custom_loop.py --model_path /models/ChatTS-14B --data gdsh,hbsn \
        --dataset_dir data --val_size 32 --eval_every 20
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from chatts_train import (SampleReader, Schedule, TrainConfig, collate, index_on_rank0, init_process, load_ds_config,
                          micro_step, prepare_engine, save_adapter, split, step_token_scale)
from chatts_train.config import add_dataclass_args, from_args
from chatts_train.processor import ChatTSProcessor


@torch.no_grad()
def held_out_loss(engine, reader, ids, pad_id, device) -> float:
    """Mean loss over the answer tokens of the held-out samples, summed over ranks (ZeRO-3: all ranks run)."""
    engine.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for i in ids[dist.get_rank()::dist.get_world_size()]:
        out = engine(**{k: v.to(device) for k, v in collate([reader[int(i)]], pad_id).items()})
        total += torch.stack([out.loss_sum.double(), out.num_tokens.double()])
    # Ranks with fewer samples still join every forward: pad with a repeat so ZeRO-3's gathers line up.
    for _ in range(-(-len(ids) // dist.get_world_size()) - len(ids[dist.get_rank()::dist.get_world_size()])):
        engine(**{k: v.to(device) for k, v in collate([reader[int(ids[0])]], pad_id).items()})
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1].clamp(min=1)).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    cfg = from_args(TrainConfig, args)

    # train()'s own set-up: process group, DeepSpeed config, and the engine in training mode
    rank, world, device = init_process(cfg.seed, cfg.gpu_memory_cap_gib)
    ds = load_ds_config(cfg.ds_config, world, cfg.micro_batch, cfg.grad_accum, cfg.fp16, cfg.offload)
    mb, ga = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    processor = ChatTSProcessor.from_pretrained(cfg.model_path)
    index = index_on_rank0(cfg, processor)
    train_ids, val_ids = split(index, cfg.val_size, cfg.seed)
    schedule = Schedule(index, train_ids, cfg.seed, mb, world, ga)
    total = schedule.total_steps(cfg.num_epochs, cfg.max_steps)
    engine, hf_ds = prepare_engine(cfg, ds, total)
    reader, pad_id = SampleReader(index, processor), processor.tokenizer.pad_token_id

    for step in range(total):
        batches = [collate([reader[int(i)] for i in ids], pad_id) for ids in schedule.micro_batches(step, rank)]
        token_scale, tokens = step_token_scale(batches, ga, world, device)
        loss = torch.tensor([sum(micro_step(engine, {k: v.to(device) for k, v in b.items()}, token_scale)[0]
                                 for b in batches)], device=device)
        dist.all_reduce(loss)
        if len(val_ids) and ((step + 1) % args.eval_every == 0 or step + 1 == total):
            val = held_out_loss(engine, reader, val_ids, pad_id, device)  # leaves the engine in training mode
            if rank == 0:
                print(f"step {step + 1}: train loss {loss.item() / tokens:.4f}, held-out loss {val:.4f}", flush=True)
    save_adapter(engine.module, os.path.join(cfg.output_dir, "adapter"))
    del hf_ds


if __name__ == "__main__":
    main()
