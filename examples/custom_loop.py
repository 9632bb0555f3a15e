"""A custom training loop from chatts_train's pieces: the same set-up as `train()`, plus its own
evaluation (held-out answer-token loss) every `--eval_every` optimizer steps.

    deepspeed --num_gpus 2 examples/custom_loop.py --model_path /models/ChatTS-14B --data gdsh,hbsn \
        --dataset_dir data --val_size 32 --eval_every 20
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from transformers import HfArgumentParser

from chatts_train import SampleReader, TrainConfig, collate, micro_step, save_adapter, setup, step_token_scale


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
    parser = HfArgumentParser(TrainConfig)  # TrainConfig's options, plus this loop's own
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the launcher
    cfg, args = parser.parse_args_into_dataclasses()

    run = setup(cfg)  # train()'s own set-up: config check, data, run record, engine in training mode
    engine, device, world, ga = run.engine, run.device, run.world, run.sampler.grad_accum
    reader, pad_id = SampleReader(run.index, run.processor), run.processor.tokenizer.pad_token_id

    for step in range(run.start_step, run.total_steps):
        batches = [collate([reader[int(i)] for i in ids], pad_id, multiple=run.plan.pad_to)  # the plan's padding
                   for ids in run.sampler.micro_batches(step, run.rank)]
        token_scale, tokens, _ = step_token_scale(batches, ga, world, device)
        loss = sum(micro_step(engine, {k: v.to(device) for k, v in b.items()}, token_scale) for b in batches)
        dist.all_reduce(loss)
        if len(run.val_ids) and ((step + 1) % args.eval_every == 0 or step + 1 == run.total_steps):
            val = held_out_loss(engine, reader, run.val_ids, pad_id, device)  # leaves the engine in training mode
            if run.rank == 0:
                print(f"step {step + 1}: train loss {loss.item() / tokens:.4f}, held-out loss {val:.4f}", flush=True)
    save_adapter(engine.module, os.path.join(cfg.output_dir, "adapter"))


if __name__ == "__main__":
    main()
