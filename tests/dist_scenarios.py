"""Multi-process training scenarios, run once under `torchrun --nproc_per_node 2` by test_training.py.

Each DeepSpeed start costs tens of seconds here, so one launch runs every scenario and rank 0 writes what
it saw to `<out>/results.json`; the assertions live in test_training.py. ZeRO-3 with
`stage3_param_persistence_threshold: 0`, so the tiny model is really partitioned across the 2 ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist

from chatts_train import (TrainConfig, build_model, describe_setup, load_ds_config, load_resume, micro_step,
                          prepare_engine, step_token_scale, train)
from chatts_train.training.engine import decoder_layers
from chatts_train.model.batching import collate
from chatts_train.data.indexing import index_data, resolve_sources
from chatts_train.errors import CheckpointError, TrainingError
from chatts_train.model.modeling import load_model
from chatts_train.fit.plan import Plan, apply_to_ds
from chatts_train.model.processor import ChatTSProcessor

OUT, CKPT = sys.argv[1], sys.argv[2]
RESULTS: dict = {}
torch.set_num_threads(1)


def ds_config(path: str, fp16: bool = False, **fp16_args) -> str:
    cfg = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8, "gradient_clipping": 1.0,
        "fp16": {"enabled": fp16, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1, **fp16_args},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
        "steps_per_print": 10 ** 9,
    }
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(cfg, f)
    dist.barrier()
    return path


def rows(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_with(hook):
    """A micro-step for `train(cfg, step_fn)` that routes each call through `hook(call_no, micro_step, engine,
    batch, token_scale)`."""
    calls = {"n": 0}

    def step(engine, batch, token_scale):
        calls["n"] += 1
        return hook(calls["n"], micro_step, engine, batch, token_scale)

    return step


def run(name, fn):
    try:
        RESULTS[name] = fn()
    except Exception as e:  # record and go on: one failing scenario must not hide the others
        RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}


def base_cfg(**kw) -> TrainConfig:
    """The scenarios' run: the reference plan (ZeRO-3, per-Linear, all recomputed) unless a scenario says other."""
    return TrainConfig(**{"model_path": CKPT, "fp16": False, "offload": "none", "save_steps": 2, "plan": "reference",
                          "plot": False, "tensorboard": False, "warmup_ratio": 0.0, **kw})


def interrupted_and_resumed():
    """Full run vs. SIGTERM during step 3 + --resume: same steps, same data, same losses."""
    data = os.path.join(OUT, "task.jsonl")
    ds = ds_config(os.path.join(OUT, "ds_fp32.json"))
    full_dir, cut_dir = os.path.join(OUT, "full"), os.path.join(OUT, "cut")
    engines = []

    def count(n, real, engine, batch, scale):
        engines[:] = [engine]
        return real(engine, batch, scale)

    full = train(base_cfg(data=data, ds_config=ds, output_dir=full_dir, max_steps=5, learning_rate=2e-3),
                 step_with(count))
    calls = {"micro_steps": engines[0].micro_steps, "optimizer_steps": engines[0].global_steps}

    def sigterm_on_rank0(n, real, engine, batch, scale):
        if n == 2 * 8 + 3 and dist.get_rank() == 0:  # inside optimizer step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(engine, batch, scale)

    stopped = train(base_cfg(data=data, ds_config=ds, output_dir=cut_dir, max_steps=5, learning_rate=2e-3),
                    step_with(sigterm_on_rank0))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cut_rows = rows(cut_dir)
    train(base_cfg(data=data, ds_config=ds, output_dir=cut_dir, max_steps=5, learning_rate=2e-3, resume=True))
    try:  # resuming with other settings would not continue the same run
        train(base_cfg(data=data, ds_config=ds, output_dir=cut_dir, max_steps=5, learning_rate=2e-3, resume=True,
                       seed=7, grad_accum=4))
        changed = "no error"
    except CheckpointError as e:
        changed = str(e)
    # a resume that fails on a truncated engine file leaves the run folder as it was
    broken = os.path.join(OUT, "broken")
    if dist.get_rank() == 0:
        shutil.copytree(cut_dir, broken)
        engine_dir = os.path.join(broken, "checkpoints", open(os.path.join(broken, "checkpoints", "latest")).read().strip(), "engine")
        for state in (f for f in os.listdir(engine_dir) if f.endswith("optim_states.pt")):  # every rank's
            with open(os.path.join(engine_dir, state), "r+b") as f:
                f.truncate(100)
    dist.barrier()
    setup_before = open(os.path.join(broken, "setup.json")).read()

    def resume_error(out_dir: str) -> str:
        try:
            train(base_cfg(data=data, ds_config=ds, output_dir=out_dir, max_steps=5, learning_rate=2e-3, resume=True))
            return "no error"
        except CheckpointError as e:
            return str(e)

    broken_resume = resume_error(broken)
    # one rank's file cut short: every rank stops with the same error, none waits for the other for good
    one_broken = os.path.join(OUT, "one_broken")
    if dist.get_rank() == 0:
        shutil.copytree(cut_dir, one_broken)
        engine_dir = os.path.join(one_broken, "checkpoints", open(os.path.join(one_broken, "checkpoints", "latest")).read().strip(), "engine")
        with open(next(os.path.join(engine_dir, f) for f in os.listdir(engine_dir)
                       if "zero_pp_rank_1_" in f and f.endswith("optim_states.pt")), "r+b") as f:
            f.truncate(100)
    dist.barrier()
    one_rank_resume = [None] * dist.get_world_size()
    dist.all_gather_object(one_rank_resume, resume_error(one_broken))
    index = index_data(resolve_sources(data), ChatTSProcessor.from_pretrained(CKPT), 4096)
    return {"full_summary": full, "engine_counts": calls, "stopped": stopped, "rows_before_resume": len(cut_rows),
            "broken_resume": broken_resume, "one_rank_resume": one_rank_resume,
            "broken_setup_unchanged": open(os.path.join(broken, "setup.json")).read() == setup_before,
            "task_samples": len(index), "resume_changed": changed, "task_positions": int(index.length.sum()),
            "full": rows(full_dir), "resumed": rows(cut_dir),
            "ckpts": sorted(os.listdir(os.path.join(cut_dir, "checkpoints")))}


PLANS = {  # every kind of plan the chooser can pick, pinned; "auto" is what it picks here (ZeRO stage unset)
    "auto": {},
    "zero2_selective": {"zero_stage": 2, "recompute_layers": 1},
    # compiled layers: the chooser's pick on a GPU with Triton; here Inductor's CPU kernels
    "zero1_compiled": {"zero_stage": 1, "recompute_layers": 0, "compile_layers": True},
    "zero2_compiled_selective": {"zero_stage": 2, "recompute_layers": 1, "compile_layers": True},
    "zero3_layers_none": {"zero_stage": 3, "gather_whole_layers": True, "recompute_layers": 0},
    "zero3_layers_host": {"zero_stage": 3, "gather_whole_layers": True, "recompute_layers": 1, "checkpoints_on_cpu": True},
    "zero3_linear_host": {"zero_stage": 3, "gather_whole_layers": False, "recompute_layers": 1, "checkpoints_on_cpu": True},
    "zero3_offload_layers": {"zero_stage": 3, "gather_whole_layers": True, "recompute_layers": 0, "offload": "param"},
}


def plans():
    """Every plan computes the same steps as the reference plan (ZeRO-3, per-Linear gathers, every layer
    recomputed): the same losses and the same LoRA weights after two optimizer steps, to fp32 tolerance."""
    from safetensors.torch import load_file

    ds = ds_config(os.path.join(OUT, "ds_fp32.json"))
    unpinned = os.path.join(OUT, "ds_unpinned.json")
    if dist.get_rank() == 0:
        with open(ds) as f:
            cfg = json.load(f)
        del cfg["zero_optimization"]["stage"]
        with open(unpinned, "w") as f:
            json.dump(cfg, f)
    dist.barrier()
    out = {}
    for name, pins in {"reference": {"plan": "reference"}, **PLANS}.items():
        out_dir = os.path.join(OUT, "plan_" + name)
        seen = {}

        def watch(n, real, engine, batch, scale):
            seen.setdefault("setup", describe_setup(engine))
            return real(engine, batch, scale)

        train(base_cfg(data=os.path.join(OUT, "task.jsonl"), ds_config=unpinned, output_dir=out_dir, max_steps=2,
                       learning_rate=2e-3, save_steps=0, **{"plan": "auto", **pins}), step_with(watch))
        with open(os.path.join(out_dir, "run.json")) as f:
            plan = json.load(f)["plan"]
        adapter = load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
        compiled = None
        if dist.get_rank() == 0:  # rank 0 wrote it before its train() returned
            with open(os.path.join(out_dir, "summary.json")) as f:
                compiled = json.load(f).get("compiled")
        out[name] = {"losses": [r["loss"] for r in rows(out_dir)], "plan": plan, "setup": seen["setup"], "compiled": compiled,
                     "adapter": {k: v.double() for k, v in adapter.items()}}
    ref = out["reference"]["adapter"]
    for name, r in out.items():
        mine = r.pop("adapter")
        r["adapter_max_abs_diff"] = max(float((mine[k] - ref[k]).abs().max()) for k in ref)
    out["adapter_max_abs"] = max(float(v.abs().max()) for v in ref.values())
    return out


def hpz_two_nodes():
    """2 nodes x 2 ranks (on localhost): where the base fits inside a node, the plan keeps ZeRO-3's gathers
    inside it (hpZ); the steps are those of the same run without hpZ (the base offloaded instead)."""
    ds = ds_config(os.path.join(OUT, "ds_fp32.json"))
    out = {}
    for name, pins in {"hpz": {}, "offload": {"offload": "param"}}.items():
        out_dir = os.path.join(OUT, "nodes_" + name)
        seen = {}

        def watch(n, real, engine, batch, scale):
            seen.setdefault("hpz", engine.zero_hpz_partition_size())
            return real(engine, batch, scale)

        train(base_cfg(data=os.path.join(OUT, "task.jsonl"), ds_config=ds, output_dir=out_dir, max_steps=2,
                       learning_rate=2e-3, save_steps=0, plan="auto", **pins), step_with(watch))
        with open(os.path.join(out_dir, "run.json")) as f:
            plan = json.load(f)["plan"]
        out[name] = {"losses": [r["loss"] for r in rows(out_dir)], "plan": plan, "engine_hpz": seen["hpz"]}
    return out


def training_mode_and_setup():
    """train() on the tiny checkpoint folder: every decoder layer runs in training mode, twice per micro-step
    (forward + reentrant checkpoint recompute); setup.json records the set-up the steps really ran with."""
    out_dir = os.path.join(OUT, "mode")
    seen = {"setup": None, "micro_step": 0}
    calls: dict = {}  # (micro-step, layer) -> training flag of each forward

    def watch(n, real, engine, batch, scale):
        if seen["setup"] is None:
            seen["setup"] = describe_setup(engine)
            for i, layer in enumerate(decoder_layers(engine.module)):
                layer.register_forward_pre_hook(
                    lambda m, args, i=i: calls.setdefault((seen["micro_step"], i), []).append(m.training))
        seen["micro_step"] = n
        return real(engine, batch, scale)

    train(base_cfg(data=os.path.join(OUT, "task.jsonl"), ds_config=ds_config(os.path.join(OUT, "ds_fp32.json")),
                   output_dir=out_dir, max_steps=2, save_steps=0), step_with(watch))
    with open(os.path.join(out_dir, "setup.json")) as f:
        recorded = json.load(f)
    return {"micro_steps": seen["micro_step"], "layers": seen["setup"]["decoder_layers"],
            "forwards_per_layer_and_micro_step": sorted({len(v) for v in calls.values()}),
            "pairs": len(calls), "all_training": all(all(v) for v in calls.values()),
            "setup": seen["setup"], "recorded": recorded}


def loader_matches_transformers():
    """Each rank's ZeRO-3 partitions, read straight from the shards (weights.py), equal what transformers'
    loader puts there: with and without parameter offload, partitioned or persistent small weights."""
    from chatts_train.model.modeling import load_model

    diffs = {}
    for name, zero in {"persistence_0": {"stage3_param_persistence_threshold": 0},
                       "persistence_default": {},
                       "offload_param": {"offload_param": {"device": "cpu"}}}.items():
        ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": dist.get_world_size(),
              "zero_optimization": {"stage": 3, **zero}}
        sent = {"numel": 0}
        broadcast = dist.broadcast

        def counted(tensor, *args, **kwargs):
            sent["numel"] += tensor.numel()
            return broadcast(tensor, *args, **kwargs)
        dist.broadcast = counted  # DeepSpeed's backend calls torch.distributed.broadcast at call time
        try:
            ours, hf_ds = build_model(CKPT, ds)
        finally:
            dist.broadcast = broadcast
        theirs = load_model(CKPT, dtype=torch.float32)
        worst, mass = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        for (n, a), (m, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert n == m and a.ds_tensor.shape == b.ds_tensor.shape, (n, m)
            worst = torch.maximum(worst, (a.ds_tensor.double() - b.ds_tensor.double()).abs().max().reshape(1))
            mass += a.ds_tensor.double().abs().sum()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(mass)
        diffs[name] = {"max_abs_diff": worst.item(), "abs_sum": mass.item(), "params": len(list(ours.parameters())),
                       "broadcast_numel": sent["numel"]}
        del ours, theirs, hf_ds
    return diffs


def loss_weighting():
    """The token scale: 2 ranks x accumulation 4 under ZeRO-3 with plain SGD make the same LoRA update as one
    process taking the mean over all answer tokens of the same 8 samples (of different answer lengths)."""
    import deepspeed

    from chatts_train.formats.adapter import trainable_state_dict
    from chatts_train.training.lora import add_lora

    processor = ChatTSProcessor.from_pretrained(CKPT)
    pad = processor.tokenizer.pad_token_id
    rng = np.random.default_rng(3)
    samples = [processor.encode_chat("<ts><ts/> What happens here?", [rng.normal(size=60 + 9 * k)],
                                     " ".join(["a level shift"] * (1 + 3 * (k % 3)))) for k in range(8)]
    cfg = base_cfg()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "train_batch_size": 8,
          "gradient_clipping": 0.0, "fp16": {"enabled": False}, "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model, hf_ds = build_model(CKPT, ds)
    model = add_lora(model, cfg)
    torch.manual_seed(0)  # B != 0, so that A gets gradients too (DeepSpeed broadcasts rank 0's values)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=ds)
    engine.train()
    before = trainable_state_dict(engine.module)
    mine = [collate([s], pad) for s in samples[dist.get_rank() * 4:dist.get_rank() * 4 + 4]]
    scale, total, _ = step_token_scale(mine, 4, dist.get_world_size(), engine.device)
    for b in mine:
        micro_step(engine, b, scale)
    after = trainable_state_dict(engine.module)
    out = {"optimizer_steps": engine.global_steps, "answer_tokens": total}
    del engine, hf_ds  # ZeRO-3 off again: rank 0 alone loads the reference model
    if dist.get_rank() == 0:
        ref = add_lora(load_model(CKPT, dtype=torch.float32), cfg, recompute_layers=0)
        ref.load_state_dict(before, strict=False)
        losses = [ref(**collate([s], pad)) for s in samples]
        token_mean = sum(o.loss_sum for o in losses) / sum(o.num_tokens for o in losses)
        grads = torch.autograd.grad(token_mean, [p for p in ref.parameters() if p.requires_grad])
        names = [n for n, p in ref.named_parameters() if p.requires_grad]
        expected = dict(zip(names, (-g for g in grads)))  # SGD, lr 1
        ours = {n: after[n] - before[n] for n in names}
        out["max_abs_err"] = max(float((ours[n] - expected[n]).abs().max()) for n in names)
        out["max_update"] = max(float(expected[n].abs().max()) for n in names)
        out["expected_tokens"] = int(sum(o.num_tokens for o in losses))
    dist.barrier()
    return out


def packed():
    """--packing: several samples per micro-step; the run completes with finite, falling loss."""
    ds = ds_config(os.path.join(OUT, "ds_fp32.json"))
    out_dir = os.path.join(OUT, "packed")
    summary = train(base_cfg(data=os.path.join(OUT, "task.jsonl"), ds_config=ds, output_dir=out_dir, max_steps=2,
                             packing=True, cutoff_len=400, grad_accum=2, learning_rate=2e-3))
    return {"summary": summary, "rows": rows(out_dir)}


def robustness():
    """Ranks whose micro-batches have no series next to ranks whose do (ZeRO-3 must not hang), and a CUDA
    OOM turned into a report that names the length, the sample and what to try."""
    data = os.path.join(OUT, "mixed.jsonl")
    if dist.get_rank() == 0:
        with open(os.path.join(OUT, "task.jsonl")) as f, open(data, "w") as out:
            for k, line in enumerate(f):
                row = json.loads(line)
                if k % 2:  # every other sample: text only
                    row = {"input": "No series in this one. Which anomaly?", "output": row["output"], "timeseries": []}
                out.write(json.dumps(row) + "\n")
    dist.barrier()
    ds = ds_config(os.path.join(OUT, "ds_fp32.json"))
    mixed = train(base_cfg(data=data, ds_config=ds, output_dir=os.path.join(OUT, "mixed"), max_steps=2))

    def oom(n, real, engine, batch, scale):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.45 GiB (injected by the test)")

    try:
        train(base_cfg(data=data, ds_config=ds, output_dir=os.path.join(OUT, "oom"), max_steps=1), step_with(oom))
        report = "no error"
    except TrainingError as e:
        report = str(e)
    return {"mixed_rows": rows(os.path.join(OUT, "mixed")), "mixed_summary": mixed, "oom": report}


def eval_losses(model, processor, samples, device) -> list[float]:
    losses = []
    with torch.no_grad():
        for s in samples:
            b = {k: v.to(device) for k, v in collate([s], processor.tokenizer.pad_token_id).items()}
            losses.append(float(model(**b).loss))
    return losses


def adapter_reproduces_engine():
    """Train 5 steps, rebuild the engine from the final resume checkpoint (partitioned over 2 ranks) and
    compare its outputs with rank 0's plain base model + the saved adapter via PeftModel.from_pretrained."""
    from peft import PeftModel
    from safetensors.torch import load_file

    full_dir = os.path.join(OUT, "adapter_run")
    cfg = base_cfg(data=os.path.join(OUT, "task.jsonl"), ds_config=ds_config(os.path.join(OUT, "ds_fp32.json")),
                   output_dir=full_dir, max_steps=5, learning_rate=2e-3)
    train(cfg)
    ds = load_ds_config(cfg.ds_config, dist.get_world_size(), fp16=False, offload="none")
    processor = ChatTSProcessor.from_pretrained(CKPT)
    with open(os.path.join(full_dir, "run.json")) as f:
        plan = Plan(**json.load(f)["plan"])  # the plan the run trained with
    engine, hf_ds = prepare_engine(cfg, apply_to_ds(plan, ds), 5, plan)
    step, _ = load_resume(engine, os.path.join(full_dir, "checkpoints"))
    rng = np.random.default_rng(7)
    samples = [processor.encode_chat("<ts><ts/> Which anomaly is this?", [rng.normal(size=200)], "spike"),
               processor.encode_chat("no series at all", [], "level shift")]
    engine.eval()
    ours = eval_losses(engine, processor, samples, engine.device)
    try:  # a training step in eval mode (no checkpointing) is refused, not run at 5x the memory
        batch = {k: v.to(engine.device) for k, v in collate([samples[0]], processor.tokenizer.pad_token_id).items()}
        micro_step(engine, batch, 1.0)
        eval_step = "no error"
    except TrainingError as e:
        eval_step = str(e)
    partitioned = [tuple(p.shape) for n, p in engine.module.named_parameters() if "q_proj.base_layer" in n][:1]
    del engine, hf_ds
    out = {"step": step, "engine": ours, "partitioned_shape": partitioned, "eval_mode_step": eval_step}
    if dist.get_rank() == 0:
        tensors = load_file(os.path.join(full_dir, "adapter", "adapter_model.safetensors"))
        out["adapter_keys"] = sorted(tensors)[:3]
        out["adapter_min_numel"] = min(t.numel() for t in tensors.values())
        out["adapter_nonzero_B"] = sum(int(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k)
        base = load_model(CKPT, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, os.path.join(full_dir, "adapter")).eval()
        out["peft"] = eval_losses(peft, processor, samples, "cpu")
        out["base"] = eval_losses(load_model(CKPT, dtype=torch.float32).eval(), processor, samples, "cpu")
    dist.barrier()
    return out


def learns_from_series():
    """Spike vs level shift, same question every time: only the series tell the answer apart. The demo's task
    and settings (launch.sh without a checkpoint)."""
    from peft import PeftModel

    ds = ds_config(os.path.join(OUT, "ds_learn.json"))
    out_dir = os.path.join(OUT, "learn")
    summary = train(base_cfg(data=os.path.join(OUT, "anomaly.jsonl"), ds_config=ds, output_dir=out_dir, val_size=32,
                             micro_batch=4, grad_accum=1, num_epochs=10, learning_rate=1e-2, encoder_lr=3e-3,
                             train_encoder=True, lora_encoder=False, save_steps=0, seed=1, eval_at_start=True,
                             eval_at_end=True, eval_max_new_tokens=4))
    res = {}
    if dist.get_rank() == 0:
        from chatts_train.data.indexing import split

        processor = ChatTSProcessor.from_pretrained(CKPT)
        with open(os.path.join(OUT, "anomaly.jsonl")) as f:
            lines = [json.loads(x) for x in f]
        index = index_data(resolve_sources(os.path.join(OUT, "anomaly.jsonl")), processor, 4096)
        _, val_ids = split(index, 32, seed=1)
        val = [lines[int(index.line[i]) - 1] for i in val_ids]
        model = PeftModel.from_pretrained(load_model(CKPT, dtype=torch.float32), os.path.join(out_dir, "adapter")).eval()

        def accuracy(series_for):
            right = 0
            for k, s in enumerate(val):
                series = [np.asarray(x) for x in series_for(k)]
                cands = [processor.encode_chat(s["input"], series, a) for a in ("spike", "level shift")]
                losses = [float(model(**collate([c], 151643)).loss_sum) for c in cands]
                right += ("spike", "level shift")[int(np.argmin(losses))] == s["output"]
            return right / len(val)

        perm = np.random.default_rng(0).permutation(len(val))
        with torch.no_grad():
            res = {"accuracy": accuracy(lambda k: val[k]["timeseries"]),
                   "shuffled": accuracy(lambda k: val[perm[k]]["timeseries"]),
                   "shuffled_label_agreement": float(np.mean([val[k]["output"] == val[perm[k]]["output"]
                                                              for k in range(len(val))])),
                   "rows": rows(out_dir),
                   "eval_at_end": json.load(open(os.path.join(out_dir, "eval", "eval_summary.json"))),
                   "summary": summary}
        # `chatts-train eval --run DIR`: model, adapter and held-out split from the run's record alone
        from argparse import Namespace

        from chatts_train.use.evaluate import run_eval

        res["eval_run"] = run_eval(Namespace(run=out_dir, model=None, adapter=None, device="cpu", batch_size=8,
                                             max_new_tokens=4, out=os.path.join(OUT, "eval_run")))
        with open(os.path.join(out_dir, "eval", "eval_samples.jsonl")) as f:
            at_end = sorted((r["line"], r["prediction"]) for r in map(json.loads, f))
        with open(os.path.join(OUT, "eval_run", "eval_samples.jsonl")) as f:
            res["eval_run_same_answers"] = at_end == sorted((r["line"], r["prediction"]) for r in map(json.loads, f))
    dist.barrier()
    return res


def fp16_loss_scaling():
    """fp16 on the CPU accelerator (patched: it refuses fp16): dynamic scaler, overflow skips + lowers."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True
    data = os.path.join(OUT, "task.jsonl")
    ds = ds_config(os.path.join(OUT, "ds_fp16.json"), fp16=True, hysteresis=1, loss_scale_window=1000)
    overflow_steps = {2, 3}  # optimizer steps (1-based) that get an inf in their backward

    def inject(n, real, engine, batch, scale):
        step = (n - 1) // 8 + 1
        return real(engine, batch, float("inf") if step in overflow_steps and n % 8 == 1 else scale)

    out = {}
    train(base_cfg(data=data, ds_config=ds, output_dir=os.path.join(OUT, "fp16"), max_steps=5, fp16=True,
                   learning_rate=1e-3), step_with(inject))
    out["rows"] = rows(os.path.join(OUT, "fp16"))
    # scale at its minimum: the next overflow must stop the run with a message and a checkpoint
    ds_min = ds_config(os.path.join(OUT, "ds_fp16_min.json"), fp16=True, hysteresis=1, initial_scale_power=1,
                       min_loss_scale=1)
    try:
        train(base_cfg(data=data, ds_config=ds_min, output_dir=os.path.join(OUT, "fp16min"), max_steps=5, fp16=True),
              step_with(lambda n, r, e, b, s: r(e, b, float("inf") if n % 8 == 1 else s)))
        out["min_scale"] = "no error"
    except TrainingError as e:
        out["min_scale"] = str(e)
        out["min_scale_ckpt"] = sorted(os.listdir(os.path.join(OUT, "fp16min", "checkpoints")))
    # NaN losses for max_bad_steps steps in a row stop the run
    try:
        train(base_cfg(data=data, ds_config=ds, output_dir=os.path.join(OUT, "nan"), max_steps=5, fp16=True,
                       max_bad_steps=2), step_with(lambda n, r, e, b, s: r(e, b, s) * float("nan")))
        out["nan"] = "no error"
    except TrainingError as e:
        out["nan"] = str(e)
    return out


if __name__ == "__main__":
    import deepspeed

    from chatts_train.fit.cpu_comm import fix_cpu_accelerator

    fix_cpu_accelerator()  # before the process group, as init_process does
    deepspeed.init_distributed()
    for name in sys.argv[3].split(","):
        run(name, globals()[name])
    if dist.get_rank() == 0:
        with open(os.path.join(OUT, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    dist.barrier()
