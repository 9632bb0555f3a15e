"""What a micro-step of the real loop costs by what it is fed: the loop's own engine (train()'s `setup`) on the
loop's own data, its `micro_step`, timed per micro-step with the GPU drained before and after (memprobe's way),
in arms that differ in one thing each:

  same      one real sample of ~--length positions, repeated (what memprobe does)
  probe     memprobe's synthetic sample of that length, repeated
  new       --count real samples, each of a length not run before in this process
  seen      the same samples again (every length now run once)
  loop      --count more new samples as the loop runs them: no drain between micro-steps, losses read at the end

    python benchmarks/micro_step_ab.py [--length 1600] [--count 12] [training options, as launch.sh takes them]

Writes OUTPUT_DIR/ab.json (per arm: each micro-step's host time to return and its time with the GPU drained) and, for one
micro-step of `new` and one of `seen`, the profiler's host-op table (self CPU time) and kernel table.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import torch

    from chatts_train.data.indexing import SampleReader
    from chatts_train.model.batching import collate
    from chatts_train.training.config import TrainConfig, parse_config
    from chatts_train.training.loop import micro_step, step_token_scale
    from chatts_train.training.run import setup
    from instruments import kernel_budget, start_profile, take_option
    from memprobe import probe_batch

    argv = sys.argv[1:]
    length, count = int(take_option(argv, "--length", "1600")), int(take_option(argv, "--count", "12"))
    cfg = parse_config(TrainConfig, argv)
    run, out = setup(cfg), cfg.output_dir
    engine, device = run.engine, run.device
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    reader, pad = SampleReader(run.index, run.processor), run.processor.tokenizer.pad_token_id

    # samples of distinct lengths, nearest --length first: `same` takes the nearest, then `new`, then `loop`
    lengths, first = run.index.length, {}
    for i in sorted(range(len(lengths)), key=lambda i: abs(int(lengths[i]) - length)):
        first.setdefault(int(lengths[i]), i)
    picked = list(first.values())
    if len(picked) < 1 + 2 * count:
        sys.exit(f"need {1 + 2 * count} samples of distinct lengths, the data has {len(picked)}")
    to_dev = (lambda b: {k: v.to(device) for k, v in b.items()})
    batch_of = (lambda i: to_dev(collate([reader[i]], pad)))
    same = batch_of(picked[0])
    n = int(same["input_ids"].shape[1])
    config = engine.module.config
    probe = to_dev(collate([probe_batch(n, config.ts_spec, config.vocab_size)], pad))
    new = [batch_of(i) for i in picked[1:1 + count]]
    later = [batch_of(i) for i in picked[1 + count:1 + 2 * count]]
    ga = run.sampler.grad_accum

    def timed(batches: list, profile: int | None = None, name: str = "") -> list[dict]:
        scale, *_ = step_token_scale(batches, ga, run.world, device)
        rows = []
        for k, b in enumerate(batches):
            prof = start_profile() if profile == k and gpu else None
            sync()
            t = time.perf_counter()
            micro_step(engine, b, scale)
            host = time.perf_counter() - t
            sync()
            rows.append({"positions": int(b["input_ids"].shape[1]), "host_s": round(host, 4),
                         "s": round(time.perf_counter() - t, 4)})
            if prof is not None:
                prof.stop()
                rows[-1]["budget"] = kernel_budget(prof, rows[-1]["s"])
                averages = prof.key_averages()
                with open(os.path.join(out, f"host_ops_{name}.txt"), "w") as f:
                    f.write(averages.table(sort_by="self_cpu_time_total", row_limit=45))
                with open(os.path.join(out, f"kernels_{name}.txt"), "w") as f:
                    f.write(averages.table(sort_by="cuda_time_total", row_limit=30))
        return rows

    def as_loop(batches: list) -> dict:
        scale, *_ = step_token_scale(batches, ga, run.world, device)
        sync()
        t = time.perf_counter()
        losses = [micro_step(engine, b, scale) for b in batches]
        float(torch.stack(losses).sum())
        return {"positions": sum(int(b["input_ids"].shape[1]) for b in batches),
                "s": round(time.perf_counter() - t, 4), "micro_steps": len(batches)}

    arms = {"warm": timed([same] * ga)}  # the first micro-steps (compiling, the allocator's first blocks)
    arms["same"] = timed([same] * ga)
    arms["probe"] = timed([probe] * ga)
    arms["new"] = timed(new, profile=count // 2, name="new")
    arms["seen"] = timed(new, profile=count // 2, name="seen")
    arms["loop"] = as_loop(later)
    arms["loop_seen"] = as_loop(later)
    report = {"positions_same": n, "plan": run.plan.line(), "arms": arms, "median_s": {}}
    for name, rows in arms.items():
        if isinstance(rows, list):
            steps = sorted(r["s"] for r in rows)
            report["median_s"][name] = steps[len(steps) // 2]
        else:
            report["median_s"][name] = round(rows["s"] / rows["micro_steps"], 4)
    with open(os.path.join(out, "ab.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("[ab] " + json.dumps(report["median_s"]) + f" (positions of `same`: {n})", flush=True)


if __name__ == "__main__":
    main()
