"""One series -> the text prefix and the encoder rows the official ChatTS processor produces.

Everything here follows `shared/CHATTS_FORMAT.md` digit for digit: the model only knows inputs identical
to the official processor's, so the normalisation is done in float64 exactly as numpy does it there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TS_PLACEHOLDER = "<ts><ts/>"


@dataclass(frozen=True)
class TSSpec:
    """What the encoder expects, read from the `ts` block of config.json."""

    patch_size: int
    max_length: int  # longest series the encoder accepts (the position table on 0801)
    use_position_embedding: bool
    embedding_dim: int = 16

    @property
    def release(self) -> str:
        return "0801" if self.use_position_embedding else "legacy"

    @property
    def row_width(self) -> int:
        extra = self.embedding_dim if self.use_position_embedding else 0
        return self.patch_size * (1 + extra)

    @classmethod
    def from_ts_config(cls, ts: dict) -> "TSSpec":
        use_pos = bool(ts.get("use_position_embedding", False))
        # Only the 0801 position table bounds a series; the legacy encoder takes any length.
        max_len = int(ts.get("max_sequence_length", ts.get("max_length", 32768))) if use_pos else 2**31 - 1
        return cls(
            patch_size=int(ts["patch_size"]),
            max_length=max_len,
            use_position_embedding=use_pos,
            embedding_dim=int(ts.get("embedding_dim", 16)),
        )

    def num_patches(self, length: int) -> int:
        return math.ceil(length / self.patch_size)


def normalise(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Official `sp_encoding`: centre on the mean, scale so that |z| <= 3. Returns (z, mean, scale)."""
    mean = np.mean(x)
    y = x - mean
    scale = 1.0
    if np.any(np.abs(y) >= 3.0):
        scale = np.max(np.abs(y)) / 3.0
        y = y / scale
    return y, mean, scale


def prefix(x: np.ndarray, mean: float, scale: float, spec: TSSpec) -> str:
    """The text the official processor writes before a series' `<ts><ts/>` pair, digit for digit: its
    statistics in the series' own dtype (float32 input gives float32 means), max/min as Python's built-ins
    pick them (the first of equal values, so 0.0 and -0.0 print as the official prompt prints them)."""
    if spec.use_position_embedding:
        top, bottom = x[np.flatnonzero(x == np.max(x))[0]], x[np.flatnonzero(x == np.min(x))[0]]
        return (
            f"[offset={-mean:.4f}|scaling={scale:.4f}|length={len(x)}|max={top:.4f}"
            f"|min={bottom:.4f}|left={x[0]:.4f}|right={x[-1]:.4f}]"
        )
    return f"[Value Offset: {-mean:.4f}|Value Scaling: {scale:.4f}]"


def encoder_rows(z: np.ndarray, spec: TSSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of one normalised series: values [n, patch] (float32) and position ids [n, patch] (long).

    The last partial patch is padded with zeros (legacy) or the last value (0801); padded points look up
    the padding row `max_length` of the position table. The encoder concatenates each patch's values with
    its position embeddings, so the rows it sees are those of the official processor + encoder.
    """
    length, p = len(z), spec.patch_size
    n = spec.num_patches(length)
    values = np.empty(n * p, dtype=np.float32)
    values[:length] = z
    values[length:] = z[-1] if spec.use_position_embedding else 0.0
    positions = np.full(n * p, spec.max_length, dtype=np.int64)
    positions[:length] = np.arange(length)
    return torch.from_numpy(values.reshape(n, p)), torch.from_numpy(positions.reshape(n, p))


def check_series(raw, spec: TSSpec) -> np.ndarray | str:
    """A float64 array, or the reason this value is not a usable series (for the data error report)."""
    if not isinstance(raw, list):
        return f"a series must be a list of numbers, got {type(raw).__name__}"
    if len(raw) == 0:
        return "empty series"
    try:
        x = np.array(raw)
    except ValueError:  # ragged nesting
        x = np.array(raw, dtype=object)
    # numpy reads True as 1 and an int beyond int64 as an object: only real numbers are values. Python-level
    # checks only where numpy cannot tell (values equal to 0 or 1, object arrays), to keep indexing fast.
    if x.ndim == 1 and x.dtype.kind in "iuf":
        at = next((int(i) for i in np.flatnonzero((x == 0) | (x == 1)) if isinstance(raw[i], (bool, np.bool_))), None)
    else:
        at = next((i for i, v in enumerate(raw) if isinstance(v, (bool, np.bool_))
                   or not isinstance(v, (int, float, np.integer, np.floating))), None)
    if at is not None:
        bad = raw[at]
        if isinstance(bad, (list, tuple)):
            return "a series must be a flat list of numbers (one placeholder per variable)"
        return f"non-numeric value {bad!r} in series"
    x = x.astype(np.float64, copy=False) if x.dtype.kind in "iuf" else np.array(raw, dtype=np.float64)
    if not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x))[0])
        return f"non-finite value {x[i]} at point {i}"
    with np.errstate(over="ignore"):
        if not (np.isfinite(x.sum()) and np.isfinite(x.max() - x.min())):
            return "values so large that their mean or range overflows (|x| near 1e308)"
    if len(x) > spec.max_length:
        return f"series of {len(x)} points is longer than the encoder's {spec.max_length} (ts.max_length)"
    return x
