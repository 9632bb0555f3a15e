"""Batching: pad token sequences and pack every encoder row of the batch into one flat tensor.

The model runs the encoder once per step over all rows and writes row k to the k-th `<ts>` token of the
[batch, seq] grid in row-major order, which is the order the rows are concatenated in here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..tokens import IGNORE_INDEX, TS_TOKEN_ID


def collate(samples: Sequence, pad_id: int, padding_side: str = "right", multiple: int = 1) -> dict[str, torch.Tensor]:
    """`samples` are `processor.Encoded`. Right padding for training, left for batched generation; the width a
    multiple of `multiple` (the plan's pad_to). With labels (training, scoring) the batch also carries the `<ts>`
    positions of the flattened ids (`ts_index`) and the `answer_positions` (`answer_index`), and, right-padded,
    no attention mask."""
    width = -(-max(len(s) for s in samples) // multiple) * multiple
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    has_labels = samples[0].labels is not None
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for b, s in enumerate(samples):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        input_ids[b, cols] = s.input_ids
        attention_mask[b, cols] = 1
        if has_labels:
            labels[b, cols] = s.labels
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "ts_patches": torch.cat([s.ts_patches for s in samples]),
        "ts_positions": torch.cat([s.ts_positions for s in samples]),
    }
    ts_index = torch.nonzero(input_ids.reshape(-1) == TS_TOKEN_ID).flatten()  # padding is pad_id, never `<ts>`
    if len(ts_index) != len(out["ts_patches"]):
        raise ValueError(f"{len(ts_index)} `<ts>` positions for {len(out['ts_patches'])} encoder rows")
    if has_labels:
        # Where the training forward writes the encoder's rows and reads its loss, found here on the host: on
        # the GPU each is a search whose size the host must wait for (`nonzero`, a boolean index), and it could
        # not queue the backward before the forward had run.
        out.update(labels=labels, ts_index=ts_index, answer_index=answer_positions(labels))
        if padding_side == "right":
            # No mask: under causal attention no position sees a later one, so a row's real positions never see
            # the pads after them, and pads carry no label. Given a mask, transformers checks it on the device
            # (`mask.all()`, a wait) and, where a row is padded, sends SDPA to its slower masked kernel.
            del out["attention_mask"]
    return out


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions of the flattened [batch, seq] grid whose next token carries a label."""
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return rows * labels.shape[1] + cols


def pack(samples: Sequence, pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Several samples in one row: positions restart at each sample and, with no attention mask,
    transformers builds a block-diagonal causal mask from those positions, so attention stays within each
    sample. One micro-step then pays ZeRO-3's weight gathering once for the whole pack. The pads that make the
    width a multiple of `multiple` are a block of their own."""
    ids = torch.cat([s.input_ids for s in samples])
    joined = type(samples[0])(
        input_ids=ids,
        ts_patches=torch.cat([s.ts_patches for s in samples]),
        ts_positions=torch.cat([s.ts_positions for s in samples]),
        labels=torch.cat([s.labels for s in samples]) if samples[0].labels is not None else None,
    )
    out = collate([joined], pad_id, multiple=multiple)
    pads = out["input_ids"].shape[1] - len(ids)
    out["position_ids"] = torch.cat([torch.arange(len(s)) for s in samples] + [torch.arange(pads)]).unsqueeze(0)
    # No label crosses a sample boundary: each sample starts with its (unlabelled) prompt.
    out.pop("attention_mask", None)
    return out
