"""Answers from a ChatTS model (optionally with a LoRA adapter): KV-cache generation, batched with left
padding; fp16 on GPU, fp32 on CPU. `chatts-train generate` is the command line."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..formats.adapter import WEIGHTS, read_adapter
from ..model.batching import collate
from ..errors import CheckpointError, DataError
from ..model.modeling import ChatTSForCausalLM, load_model
from ..model.processor import ChatTSProcessor
from ..model.timeseries import TS_PLACEHOLDER, TSSpec, check_series


def load_adapter(model: ChatTSForCausalLM, adapter_dir: str):
    """PEFT adapter on our model, with clear errors for a missing, corrupt or mismatched adapter."""
    from peft import PeftModel

    _, tensors = read_adapter(adapter_dir)
    weights = os.path.join(adapter_dir, WEIGHTS)
    modules = dict(model.named_modules())
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_" in name:
            base = modules.get(name.split(".lora_")[0])
            if base is None:
                raise CheckpointError(f"{weights}: `{key}` has no module `{name.split('.lora_')[0]}` in this model")
            fan = base.in_features if ".lora_A" in name else base.out_features
            size = t.shape[1] if ".lora_A" in name else t.shape[0]
            if size != fan:
                raise CheckpointError(f"{weights}: `{key}` is {tuple(t.shape)}, which does not fit this model's "
                                      f"{name.split('.lora_')[0]} ({base.in_features} -> {base.out_features}); "
                                      f"the adapter was trained on another model shape")
    return PeftModel.from_pretrained(model, adapter_dir)


def load_for_inference(model_path: str, adapter: Optional[str] = None, device: Optional[str] = None):
    """(model, processor, device) ready to generate; fp16 on GPU, fp32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_model(model_path, dtype=dtype)
    if adapter:
        model = load_adapter(model, adapter)
    processor = ChatTSProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor, device


@torch.no_grad()
def generate(model, processor: ChatTSProcessor, prompts: Sequence[tuple[str, list]], device: torch.device,
             max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             streamer=None, synced_gpus: bool = False) -> list[str]:
    """Answers to (question, series) pairs, one batch, left-padded, with the KV cache."""
    tok = processor.tokenizer
    samples = [processor.encode_chat(q, [np.asarray(s, dtype=np.float64) for s in series]) for q, series in prompts]
    batch = {k: v.to(device) for k, v in collate(samples, tok.pad_token_id, padding_side="left").items()}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, use_cache=True, streamer=streamer,
                         eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id],
                         pad_token_id=tok.pad_token_id, synced_gpus=synced_gpus, **sampling)
    return [tok.decode(seq, skip_special_tokens=True).strip() for seq in out[:, batch["input_ids"].shape[1]:]]


def read_series_file(path: str) -> list[list[float]]:
    """JSON: a list of numbers (one series) or a list of lists; CSV: one series per column (header optional)."""
    if not os.path.isfile(path):
        raise DataError(f"series file {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        return [data] if data and not isinstance(data[0], list) else data
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    try:
        float(rows[0][0])
    except ValueError:
        rows = rows[1:]  # header
    try:
        return [[float(r[c]) for r in rows if c < len(r) and r[c] != ""] for c in range(len(rows[0]))]
    except ValueError as e:
        raise DataError(f"{path}: {e}; expected numbers, one series per column") from None


def check_question(text, series, spec: TSSpec) -> Optional[str]:
    """Why a question cannot be asked (the checks training applies), or None."""
    if not isinstance(text, str):
        return "no `input` text"
    if not isinstance(series, list):
        return "`timeseries` must be a list of series"
    if text.count(TS_PLACEHOLDER) != len(series):
        return f"{text.count(TS_PLACEHOLDER)} `<ts><ts/>` placeholders for {len(series)} series"
    for k, raw in enumerate(series):
        problem = check_series(raw, spec)
        if isinstance(problem, str):
            return f"series {k}: {problem}"
    return None


def read_questions(path: str, spec: TSSpec) -> list[dict]:
    """The rows of a JSONL file to answer; every bad row reported as `file:line: reason`, as in training."""
    if not os.path.isfile(path):
        raise DataError(f"--data {path} does not exist")
    rows, problems = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problems.append(f"{path}:{n}: invalid JSON ({e})")
                continue
            problem = check_question(row.get("input"), row.get("timeseries", []), spec) if isinstance(row, dict) \
                else "a line must be one JSON object"
            if problem:
                problems.append(f"{path}:{n}: {problem}")
            rows.append(row)
    if problems:
        raise DataError(f"{len(problems)} rows of {path} cannot be answered", problems)
    return rows


def run_generate(a: argparse.Namespace) -> None:
    model, processor, device = load_for_inference(a.model, a.adapter, a.device)
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature, top_p=a.top_p)
    if a.prompt is not None:
        from transformers import TextStreamer

        series = read_series_file(a.series) if a.series else []
        problem = check_question(a.prompt, series, processor.spec)
        if problem:
            raise DataError(f"--prompt with {a.series or 'no --series'}: {problem}")
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        answer = generate(model, processor, [(a.prompt, series)], device, streamer=streamer, **kw)[0]
        if a.out:
            with open(a.out, "w") as f:
                f.write(json.dumps({"input": a.prompt, "prediction": answer}, ensure_ascii=False) + "\n")
        return
    if not a.data:
        raise DataError("give --data FILE.jsonl, or --prompt TEXT with --series FILE.json|.csv")
    rows = read_questions(a.data, processor.spec)
    out = open(a.out, "w") if a.out else sys.stdout
    for i in tqdm(range(0, len(rows), a.batch_size), desc="generate", disable=out is sys.stdout):
        chunk = rows[i:i + a.batch_size]
        answers = generate(model, processor, [(r["input"], r.get("timeseries", [])) for r in chunk], device, **kw)
        for r, ans in zip(chunk, answers):
            out.write(json.dumps({"input": r["input"], "prediction": ans, "reference": r.get("output")},
                                 ensure_ascii=False) + "\n")
        out.flush()
    if out is not sys.stdout:
        out.close()
        print(f"wrote {len(rows)} answers to {a.out}")
