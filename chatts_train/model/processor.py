"""`ChatTSProcessor`: text + series -> model inputs, identical to the official processor's.

Call shape as in the official release: `ChatTSProcessor.from_pretrained(path)` and
`processor(text=[...], timeseries=[...], padding=True, return_tensors="pt")`. Each `<ts><ts/>` gets the
release's prefix written before it, and (unlike the official code, which splices embeddings inside the
model) is expanded here on the CPU into exactly ceil(L / patch_size) `<ts>` tokens, one per encoder row.
"""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .batching import collate
from ..errors import CheckpointError
from .modeling import read_chatts_config
from ..tokens import IGNORE_INDEX, TS_END_TOKEN_ID, TS_TOKEN_ID
from .timeseries import TS_PLACEHOLDER, TSSpec, check_series, encoder_rows, normalise, prefix

SYSTEM_PROMPT = "You are a helpful assistant."


def chat_prompt(user: str) -> str:
    """ChatML with ChatTS's system prompt, up to the assistant's turn."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def chat_answer(output: str) -> str:
    """The learned part of a sample: the answer and its closing `<|im_end|>\\n`."""
    return f"{output}<|im_end|>\n"


@dataclass
class Encoded:
    """One sample ready for the collator. `<ts>` tokens in `input_ids` mark where the rows go, in order."""

    input_ids: torch.Tensor  # [T] long
    ts_patches: torch.Tensor  # [P, patch] float32
    ts_positions: torch.Tensor  # [P, patch] long
    labels: Optional[torch.Tensor] = None  # [T] long, IGNORE_INDEX outside the answer

    def __len__(self) -> int:
        return len(self.input_ids)


def expand_placeholders(ids: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Replace the k-th `<ts>` `<ts/>` token pair with counts[k] `<ts>` tokens."""
    out: list[int] = []
    k = 0
    i = 0
    while i < len(ids):
        if ids[i] == TS_TOKEN_ID:
            if i + 1 >= len(ids) or ids[i + 1] != TS_END_TOKEN_ID or k >= len(counts):
                raise ValueError("`<ts>` must come as `<ts><ts/>`, one pair per series")
            out.extend([TS_TOKEN_ID] * counts[k])
            k += 1
            i += 2
            continue
        if ids[i] == TS_END_TOKEN_ID:
            raise ValueError("stray `<ts/>` without its `<ts>`")
        out.append(ids[i])
        i += 1
    if k != len(counts):
        raise ValueError(f"{k} placeholders for {len(counts)} series")
    return out


class ChatTSProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: TSSpec):
        self.tokenizer = tokenizer
        self.spec = spec

    @classmethod
    def from_pretrained(cls, path: str, **tokenizer_kwargs) -> "ChatTSProcessor":
        ts = read_chatts_config(path)["ts"]
        if not (os.path.isfile(os.path.join(path, "tokenizer.json"))
                or os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt"))):
            raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt, with "
                                  f"tokenizer_config.json); copy them from the published checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        if tokenizer.convert_tokens_to_ids("<ts>") != TS_TOKEN_ID:
            raise CheckpointError(f"{path}: tokenizer has no `<ts>` token at id {TS_TOKEN_ID}")
        return cls(tokenizer, TSSpec.from_ts_config(ts))

    # --- pieces the data pipeline reuses -------------------------------------------------------------

    def rewrite(self, text: str, series: Sequence[np.ndarray]) -> tuple[str, list[np.ndarray]]:
        """Write each series' prefix before its placeholder; return the text and the normalised series."""
        parts = text.split(TS_PLACEHOLDER)
        if len(parts) - 1 != len(series):
            raise ValueError(f"{len(parts) - 1} `<ts><ts/>` placeholders for {len(series)} series")
        out = [parts[0]]
        zs = []
        for x, rest in zip(series, parts[1:]):
            z, mean, scale = normalise(x)
            zs.append(z)
            out.append(prefix(x, mean, scale, self.spec) + TS_PLACEHOLDER + rest)
        return "".join(out), zs

    def encode_ids(self, prompt_ids: Sequence[int], zs: Sequence[np.ndarray],
                   answer_ids: Optional[Sequence[int]] = None) -> Encoded:
        rows = [encoder_rows(z, self.spec) for z in zs]
        ids = expand_placeholders(prompt_ids, [len(r[0]) for r in rows])
        labels = None
        if answer_ids is not None:
            labels = torch.tensor([IGNORE_INDEX] * len(ids) + list(answer_ids))
            ids = ids + list(answer_ids)
        p = self.spec.patch_size
        return Encoded(
            input_ids=torch.tensor(ids, dtype=torch.long),
            ts_patches=torch.cat([r[0] for r in rows]) if rows else torch.zeros(0, p),
            ts_positions=torch.cat([r[1] for r in rows]) if rows else torch.zeros(0, p, dtype=torch.long),
            labels=labels,
        )

    def encode_chat(self, user: str, series: Sequence[np.ndarray], answer: Optional[str] = None) -> Encoded:
        """A training sample (with `answer`) or a generation prompt, in ChatTS's chat format."""
        text, zs = self.rewrite(chat_prompt(user), series)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = None
        if answer is not None:
            answer_ids = self.tokenizer(chat_answer(answer), add_special_tokens=False)["input_ids"]
        return self.encode_ids(prompt_ids, zs, answer_ids)

    # --- the official call shape ---------------------------------------------------------------------

    def __call__(self, text: str | list[str], timeseries: Optional[list] = None, padding: bool = True,
                 return_tensors: Optional[str] = "pt", tokenize: bool = True) -> dict:
        """`timeseries` is one flat list of series for all texts, in placeholder order (as the official
        processor takes it), or a list per text."""
        texts = [text] if isinstance(text, str) else list(text)
        per_text = _split_series(texts, timeseries or [])
        rewritten = [self.rewrite(t, [self._checked(s) for s in ss]) for t, ss in zip(texts, per_text)]
        if not tokenize:
            return {"text": [r[0] for r in rewritten], "timeseries": [z for r in rewritten for z in r[1]]}
        encoded = [self.encode_ids(self.tokenizer(t, add_special_tokens=False)["input_ids"], zs)
                   for t, zs in rewritten]
        if len(encoded) > 1 and not padding and len({len(e) for e in encoded}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        # Left, as the official processor pads: its output goes straight into model.generate.
        return collate(encoded, pad_id=self.tokenizer.pad_token_id, padding_side="left")

    def _checked(self, series) -> np.ndarray:
        """The series as an array, or a ValueError for what training would reject (NaN, non-numbers, ...).
        A floating numpy array keeps its dtype, as in the official processor (`np.array(timeseries)`): its
        prefix statistics and normalised values are then computed in float32 for float32 input."""
        x = check_series(series.tolist() if isinstance(series, np.ndarray) else list(series), self.spec)
        if isinstance(x, str):
            raise ValueError(f"bad series: {x}")
        if isinstance(series, np.ndarray) and series.dtype.kind == "f":
            return series
        return x


def _split_series(texts: list[str], timeseries: list) -> list[list]:
    counts = [t.count(TS_PLACEHOLDER) for t in texts]
    if len(timeseries) == len(texts) and all(isinstance(s, (list, tuple)) and (not s or isinstance(s[0], (list, tuple, np.ndarray))) for s in timeseries) \
            and [len(s) for s in timeseries] == counts:
        return [list(s) for s in timeseries]
    if len(timeseries) != sum(counts):
        raise ValueError(f"{sum(counts)} `<ts><ts/>` placeholders in the text(s) for {len(timeseries)} series")
    out, i = [], 0
    for c in counts:
        out.append(list(timeseries[i:i + c]))
        i += c
    return out
