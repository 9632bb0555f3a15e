"""`chatts-train` command line: train, plan, inspect-data, generate, eval, merge, make-tiny, make-data."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass, replace
from typing import Optional

from .errors import ChatTSTrainError
from .tokens import TS_TOKEN_ID


def _inspect_data(args: argparse.Namespace) -> None:
    from .data.indexing import SampleReader, describe, index_data, resolve_sources
    from .model.processor import ChatTSProcessor

    processor = ChatTSProcessor.from_pretrained(args.model_path)
    index = index_data(resolve_sources(args.data, args.dataset_dir), processor, args.cutoff_len, args.strict_data)
    rows = list(describe(index))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_data_stats(rows, args.cutoff_len))
    for p in index.problems[:args.problems]:
        print(f"  {p}")
    if len(index.problems) > args.problems:
        print(f"  ... {len(index.problems) - args.problems} more problems")
    reader = SampleReader(index, processor)
    for i in range(min(args.show, len(index))):
        src = index.sources[index.source[i]]
        enc = reader[i]
        ids = enc.input_ids.tolist()
        # Show each series' run of `<ts>` positions as one marker with its length.
        parts = []
        for is_ts, run in itertools.groupby(ids, key=lambda t: t == TS_TOKEN_ID):
            run = list(run)
            parts.append(f"<ts x{len(run)}>" if is_ts else processor.tokenizer.decode(run))
        text = parts
        print(f"\n--- {src.path}:{index.line[i]} ({len(ids)} positions, {int((enc.labels != -100).sum())} "
              f"answer tokens) ---\n{''.join(text)}")


def format_data_stats(rows: list[dict], cutoff_len: int) -> str:
    def mm(d: dict) -> str:
        return f"{d['min']}/{d['median']}/{d['p95']}/{d['max']}"

    head = ["dataset", "kept", "dropped (reason: n)", "series/sample", "series length", "seq len", "answer tok"]
    body = [[r["dataset"], str(r["kept"]), ", ".join(f"{k}: {v}" for k, v in r["dropped"].items()) or "-",
             mm(r["series_per_sample"]), mm(r["series_length"]), mm(r["seq_len"]), mm(r["answer_tokens"])]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([f"statistics as min/median/p95/max; seq len = text tokens + time-series patches "
                      f"(cutoff {cutoff_len})", line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _make_tiny(args: argparse.Namespace) -> None:
    from .standins.checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.out, args.release, args.seed))


def _make_data(args: argparse.Namespace) -> None:
    from .standins.synthetic import USER_DATASETS, write_anomaly_dataset, write_datasets

    if args.task == "anomaly":
        print(write_anomaly_dataset(args.out))
        return
    sizes = {k: max(1, round(v * args.scale)) for k, v in USER_DATASETS.items()}
    print(write_datasets(args.out, sizes, args.length, args.seed))


def _generate(args: argparse.Namespace) -> None:
    from .use.generate import run_generate

    run_generate(args)


def _eval(args: argparse.Namespace) -> None:
    from .use.evaluate import run_eval

    run_eval(args)


def _merge(args: argparse.Namespace) -> None:
    from .use.merge import merge

    print(f"merged checkpoint written to {merge(args.model, args.adapter, args.out)}")


def add_generation_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="ChatTS checkpoint folder")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder from training")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


@dataclass
class PlanTarget:
    """`chatts-train plan`'s own options, beside training's: the cards to plan for (default: this machine's)."""

    gpus: Optional[int] = None  # GPUs per node (default: this machine's; 1 on a machine without CUDA)
    nodes: int = 1
    gpu_gib: Optional[float] = None  # usable memory per GPU (default: --gpu_memory_cap_gib, else this GPU's free memory)
    positions: Optional[int] = None  # the longest micro-step (default: from --data, else --cutoff_len)
    host_gbps: Optional[float] = None  # host-to-GPU copy rate, GB/s (default: measured here; 12, PCIe 3.0 x16, with --gpu_gib)


def _plan(argv: list[str]) -> None:
    """Every candidate plan for training's options on the cards named (--card, --gpus) or found here, with its
    predicted memory, micro-step time and, given the data, the whole job's time and what bounds it, without
    loading the model."""
    import torch

    from .training.config import TrainConfig, parse_config
    from .fit.dsconfig import run_ds_config, run_precision
    from .errors import ConfigError
    from .model.modeling import config_of
    from .fit.cards import card_named
    from .fit.plan import Cards, detect_cards, format_candidates, named_cards, plan_for, with_job_times

    cfg, target = parse_config((TrainConfig, PlanTarget), argv)
    per_node = target.gpus or max(torch.cuda.device_count(), 1)
    world = per_node * target.nodes
    config = config_of(cfg.model_path)
    named = cfg.card not in (None, "", "auto")
    half = run_precision(cfg.fp16, cfg.bf16, cfg.card) if named or torch.cuda.is_available() else (
        None if cfg.fp16 is False else torch.bfloat16 if cfg.bf16 else torch.float16)
    ds = run_ds_config(cfg, world, config.hidden_size, half)
    lockstep = _lockstep_positions(cfg, ds, world)
    positions = target.positions or (max(lockstep) if lockstep else cfg.cutoff_len)
    size = target.gpu_gib or cfg.gpu_memory_cap_gib
    if named:
        cards = named_cards(card_named(cfg.card), per_node, target.nodes, size, size, target.host_gbps)
    elif size or not torch.cuda.is_available():
        # cards named by their size: CUDA GPUs with the Triton that PyTorch's Linux wheels bring
        cards = Cards(per_node, target.nodes, size or 0.0, cfg.gpu_memory_cap_gib, compiler=True)
        if not cards.usable_gib:
            raise ConfigError(["no GPU here: say which cards to plan for, e.g. --card 2080ti --gpus 2 (or --gpu_gib 22)"])
    else:
        cards = detect_cards(None, world, per_node)
    if target.host_gbps:
        cards = replace(cards, host_gbps=target.host_gbps)
    _, ranked, shape = plan_for(cfg, ds, config, cards, positions, len(lockstep) if lockstep else None)
    if lockstep:
        ranked = with_job_times(ranked, shape, cards, lockstep)
    print(format_candidates(ranked, positions, cards))
    if lockstep:
        best = ranked[0]
        print(f"the job: {len(lockstep)} micro-steps per GPU ({len(lockstep) // ds['gradient_accumulation_steps']} "
              f"optimizer steps), {best.job[0] / 60:.0f} min predicted for the chosen plan, {best.job[1]}-bound "
              f"(loading and saving not included)")
    print("step times: measured on 1 x H200 (RESULTS.md), scaled by the card's data-sheet rates and links "
          "(fit/cards.py; RESULTS.md \"The users' cards\" says which inputs are measured)")
    print(f"pin a plan with its options, e.g. {ranked[0].plan.flags()}")


def _lockstep_positions(cfg, ds: dict, world: int) -> Optional[list[int]]:
    """The positions of each of the run's micro-steps as its ranks run them together, from its data as training
    samples it (Sampler.lockstep_positions); None without data."""
    from .data.indexing import index_data, resolve_sources, split
    from .model.processor import ChatTSProcessor
    from .data.sampler import Sampler

    try:
        sources = resolve_sources(cfg.data, cfg.dataset_dir)
    except ChatTSTrainError:
        return None
    index = index_data(sources, ChatTSProcessor.from_pretrained(cfg.model_path), cfg.cutoff_len, cfg.strict_data)
    train_ids, _ = split(index, cfg.val_size, cfg.seed)
    sampler = Sampler(index, train_ids, cfg.seed, ds["train_micro_batch_size_per_gpu"], world,
                      ds["gradient_accumulation_steps"], pack_to=cfg.cutoff_len if cfg.packing else 0)
    return sampler.lockstep_positions(sampler.total_steps(cfg.num_epochs, cfg.max_steps))


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the dataclass CLI owns all of train's options
        from .training.loop import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["plan"]:
        return _guard(_plan, argv[1:])
    parser = argparse.ArgumentParser(prog="chatts-train", description="ChatTS LoRA fine-tuning toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="run training (see `chatts-train train --help`)")
    sub.add_parser("plan", help="the candidate plans for training's options, predicted memory and speed, and "
                                "which one the job would choose (`chatts-train plan --help`)")
    p = sub.add_parser("inspect-data", help="per-dataset statistics of the expanded sequences")
    p.add_argument("--model_path", required=True, help="a ChatTS checkpoint (its tokenizer and ts config)")
    p.add_argument("--data", required=True)
    p.add_argument("--dataset_dir", default="data")
    p.add_argument("--cutoff_len", type=int, default=4096)
    p.add_argument("--strict_data", action="store_true")
    p.add_argument("--show", type=int, default=0, help="print N rendered prompts")
    p.add_argument("--problems", type=int, default=10, help="print up to N bad-sample reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_inspect_data)
    p = sub.add_parser("make-tiny", help="write a tiny random ChatTS checkpoint in the published format")
    p.add_argument("--out", required=True)
    p.add_argument("--release", choices=["0801", "legacy"], default="0801")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_make_tiny)
    p = sub.add_parser("make-data", help="write the four synthetic datasets + dataset_info.json")
    p.add_argument("--out", required=True)
    p.add_argument("--task", choices=["users", "anomaly"], default="users",
                   help="users: the four datasets in the users' shape; anomaly: the demo's learnable task "
                        "(spike or level shift, 160 samples of 128 points)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the users' 421 samples")
    p.add_argument("--length", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_make_data)
    p = sub.add_parser("generate", help="answer questions about series with a model (+ adapter)")
    add_generation_args(p)
    p.add_argument("--data", default=None, help="JSONL with input/timeseries (output is kept as reference)")
    p.add_argument("--prompt", default=None, help="one question with a <ts><ts/> per series (streams the answer)")
    p.add_argument("--series", default=None, help="for --prompt: JSON list(s) or CSV, one series per column")
    p.add_argument("--out", default=None, help="write answers as JSONL here (default: stdout)")
    p.set_defaults(fn=_generate)
    p = sub.add_parser("eval", help="generate on the held-out split and score it")
    add_generation_args(p, model_required=False)
    p.add_argument("--run", default=None, help="a training output folder: its model, adapter and held-out split "
                                               "(run.json); the options below are then not needed")
    p.add_argument("--data", default=None)
    p.add_argument("--dataset_dir", default="data")
    p.add_argument("--cutoff_len", type=int, default=4096)
    p.add_argument("--val_size", type=float, default=None, help="as in training (fraction or count)")
    p.add_argument("--seed", type=int, default=42, help="as in training")
    p.add_argument("--out", default=None, help="default: RUN/eval with --run, else runs/eval")
    p.set_defaults(fn=_eval)
    p = sub.add_parser("merge", help="fold an adapter into the base and write a ChatTS checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_merge)
    args = parser.parse_args(argv)
    _guard(args.fn, args)


def _guard(fn, arg) -> None:
    """Our errors are for the user: print the message, not a traceback."""
    try:
        fn(arg)
    except ChatTSTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
