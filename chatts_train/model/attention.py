"""Which attention a card runs, and the exact path for cards without SDPA's flash kernel.

ChatTS-14B has 40 query heads and 8 KV heads. Given no mask, transformers hands SDPA the 8 KV heads with
`enable_gqa=True`. Only the flash kernel (sm80+) takes GQA; the memory-efficient kernel has no GQA path, so
on a Turing card, or with flash switched off, SDPA falls to its math kernel and builds the [40 x T x T]
scores (1.8-3.7x the micro-step, up to 9.6 GiB more at 4,096 positions: benchmarks/RESULTS.md, "Turing").
`sdpa_expanded_kv` repeats K/V to the query heads first, which the memory-efficient kernel takes: the same
numbers as GQA, at about twice flash's attention time instead of thirteen times.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

EXPANDED_KV = "sdpa_expanded_kv"
# torch.nn.attention.SDPBackend's values, as torch._fused_sdp_choice returns them
SDPA_BACKENDS = {-1: "none", 0: "math", 1: "flash", 2: "memory-efficient", 3: "cudnn", 4: "overrideable"}


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, kv_heads, T, dim] -> [batch, kv_heads * n, T, dim], each KV head next to its query heads."""
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def sdpa_expanded_kv(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with K/V repeated to the query heads before the kernel (no `enable_gqa`)."""
    n = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n), repeat_kv(value, n)
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:  # as transformers decides it (sdpa_attention.py): a shape test first, for torch.compile
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=is_causal)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `sdpa_expanded_kv` an attention implementation transformers knows, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(EXPANDED_KV, sdpa_expanded_kv)
    AttentionMaskInterface.register(EXPANDED_KV, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def allow_sdpa_kernels(flash: bool) -> None:
    """The process's SDPA kernels: cuDNN's never (it plans anew for every sequence length, ~0.14 s a 14B micro-step
    on 1 x H200: benchmarks/RESULTS.md), flash where `flash` (off: a bigger card runs a Turing card's kernels)."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(flash)


def choose_attention(capability: Optional[tuple[int, int]], sdpa_flash: bool, fa2_installed: bool,
                     requested: Optional[str] = None) -> str:
    """The attention implementation of a run: `capability` of its card (None: the CPU), whether SDPA's flash
    kernel may run there (sm80+ and not switched off), whether the flash-attn package is installed.
    Default: SDPA with GQA in the kernel where flash runs, K/V expanded where it cannot, FlashAttention-2 where
    it is installed and runs. "sdpa" asked for on a card without flash gets the expanded path too: plain SDPA
    there would be the math kernel."""
    fa2_ok = fa2_installed and capability is not None and capability >= (8, 0)
    if requested == "eager":
        return requested
    if requested == "flash_attention_2" and not fa2_ok:
        raise ValueError("flash_attention_2 needs the flash-attn package and an sm80+ GPU; use sdpa instead")
    if requested not in (None, "auto", "sdpa", "flash_attention_2"):
        raise ValueError(f"unknown attention implementation {requested!r}: use sdpa, flash_attention_2 or eager")
    if fa2_ok and requested != "sdpa":
        return "flash_attention_2"
    return "sdpa" if capability is None or sdpa_flash else EXPANDED_KV


def sdpa_backend(attention: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                 positions: int = 256) -> Optional[str]:
    """The SDPA kernel that serves a causal training call of `attention` on this process's device, as PyTorch's
    dispatcher picks it under the current switches (flash, cuDNN, ...). None where SDPA is not used."""
    if attention not in ("sdpa", EXPANDED_KV):
        return None
    q = torch.zeros(1, heads, positions, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(1, heads if attention == EXPANDED_KV else kv_heads, positions, head_dim, dtype=dtype, device=device)
    choice = torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, enable_gqa=attention == "sdpa" and heads != kv_heads)
    return SDPA_BACKENDS.get(int(choice), str(int(choice)))
