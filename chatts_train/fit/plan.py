"""How a run executes, decided once before any process loads the model: the plan.

A plan says where the frozen base lives (ZeRO stage 1, or 2 where pinned: whole on every GPU, only LoRA's
optimizer state (and at stage 2 its gradients) partitioned by ZeRO; stage 3: partitioned, gathered layer by
layer or Linear by Linear; with parameter offload: in host RAM), how many decoder layers are recomputed in
backward (the first `recompute_layers`; the others keep their activations), whether the recomputed layers'
checkpoints wait in host memory, hierarchical partitioning across nodes, and the allocator and NCCL settings.
What the user pinned (a flag or the DeepSpeed file) stays; `choose` decides the rest: the fastest candidate
whose predicted peak fits the cards with a margin. The loop, memprobe, custom loops and run.json all read the
plan from here; nothing else decides these things.

The memory model counts what each piece of a step keeps on a GPU (bytes per position of a layer's saved
tensors from the shapes; weights from the config) and adds terms calibrated against memprobe on 14B
(benchmarks/RESULTS.md, "Plans"). The speed model is a table of measured step times.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

from ..errors import ConfigError
from ..model.attention import EXPANDED_KV, allow_sdpa_kernels, choose_attention
from .cards import CARDS, REFERENCE_CARD, Card, card_named, detected_card, resolve_card

GiB = 1024 ** 3

# ---- calibration: every number below was measured on 1 x H200 (ChatTS-14B, fp16, LoRA r8 q/k/v), each row
# ---- naming the section of benchmarks/RESULTS.md (or HISTORY.md) that holds it; tests/test_plan.py holds the
# ---- models to the measured peaks.
MARGIN = 0.05  # the choice's stated margin, not a measurement
RESERVED_OVER_ALLOCATED = 0.10  # the allocator's cache over what tensors hold: 8-9% (HISTORY.md section 8)
CONTEXT_GIB = 1.5  # outside PyTorch's allocator per uncapped rank: 1.3-2.1 GiB (HISTORY.md sections 7-8)
# What a step holds beside weights and kept activations (LoRA's weights, gradients and Adam state, the loss's
# vocabulary chunks, backward's transients): a fixed part by ZeRO stage and a part per position ("Plans")
FIXED_GIB = {1: 0.55, 2: 0.55, 3: 0.45}
PER_POSITION_BYTES = 40_000
OFFLOAD_FIXED_GIB = 1.0  # parameter offload's extra on the GPU, 0.89-1.05 GiB in three runs ("Plans")
PER_LINEAR_LIVE = 3e8  # ZeRO-3 per-Linear gathers: stage3_max_live_parameters of ds_config.json (a setting)
# Seconds per micro-step, memprobe, by how the base is held: (no layer recomputed, all 48). Base whole at ZeRO-2
# ("Plans"; ZeRO-1 runs 1.04-1.12x faster: "ZeRO-1 for the base whole"); ZeRO-3 all recomputed ("Plans");
# ZeRO-3 none recomputed not measured: ZeRO-2's ratio of the two applied.
STEP_S = {
    1600: {"whole": (0.272, 0.416), "layers": (0.479, 0.733), "linear": (0.90, 1.38)},
    4096: {"whole": (0.487, 0.712), "layers": (0.493, 0.72), "linear": (1.02, 1.489)},
}
HOST_CHECKPOINTS_FACTOR = 1.10  # recomputed layers' inputs to host memory and back: +10% at 4,096 (HISTORY.md 8)
COMPILED_STEP_RATIO = {1600: 0.711, 4096: 0.909}  # compiled / op by op ("The launch-bound micro-step")
COMPILE_S = 12.0  # compiling the 14B layers in the first step, nothing cached: 13.1 s against ~1.5 s ("A C++ kernel in a GPU graph")
# The card model (step_time): the shares of the data sheet's rate the H200 reached, taken to hold on other
# cards ("The users' cards"): GEMMs 658-691 of 989 TFLOPS; SDPA flash / memory-efficient with K/V expanded
# 2.70 / 5.30 ms a layer's forward and backward at 4,096 positions.
GEMM_SHARE = 0.68
ATTENTION_SHARE = {"flash": 0.19, "memory-efficient": 0.098}
@dataclass(frozen=True)
class Shape:
    """What the memory model needs of a ChatTS config."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    base_numel: int  # all frozen weights
    layer_numel: int  # one decoder layer's
    bytes_per_value: int  # the run's dtype (2 in fp16 / bf16, 4 on the CPU in fp32)
    head_numel: int = 0  # lm_head's [vocab x hidden]
    encoder_numel: int = 0  # the time-series encoder's

    @classmethod
    def of(cls, config, bytes_per_value: int = 2) -> "Shape":
        h, inter, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        kv = config.num_key_value_heads * h // config.num_attention_heads
        layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
        ts = config.ts_spec
        width = ts.row_width
        enc_h = int(config.ts["hidden_size"])
        encoder = width * enc_h + enc_h + (int(config.ts["num_layers"]) - 1) * (enc_h * enc_h + enc_h)
        if ts.use_position_embedding:
            encoder += (ts.max_length + 1) * ts.embedding_dim
        base = (1 if config.tie_word_embeddings else 2) * config.vocab_size * h + n * layer + h + encoder
        return cls(n, h, inter, kv, base, layer, bytes_per_value, config.vocab_size * h, encoder)

    def kept_bytes_per_position(self, expanded_kv: bool = False) -> int:
        """What one decoder layer keeps for backward per position when it is not recomputed (lean activations,
        LoRA on q/k/v, frozen Linears keep no input): both norms' inputs, LoRA's input, q, k, v and the
        attention output for the fused attention kernel's backward, the MLP's gate and up. With K/V expanded
        to the query heads (cards without SDPA's flash kernel) the kernel keeps the expanded K and V."""
        h, inter = self.hidden, self.intermediate
        kv = h if expanded_kv else self.kv_dim
        return self.bytes_per_value * (2 * h + h + h + 2 * kv + h + 2 * inter)

    def checkpoint_bytes_per_position(self) -> int:
        """What a recomputed layer keeps: its input."""
        return self.bytes_per_value * self.hidden


@dataclass(frozen=True)
class Cards:
    """The GPUs a run has, as the plan sees them: per node, how many nodes, and per GPU the memory a run may
    use (the card's free memory, less what other processes already hold on it, or the per-process cap)."""

    per_node: int
    nodes: int
    usable_gib: float
    cap_gib: Optional[float] = None  # a per-process cap: the allocator's cache must fit under it, the context not
    kind: str = "cuda"  # "cpu": host RAM shared by the node's ranks, no allocator or NCCL settings
    host_gbps: float = 12.0  # host-to-GPU copies (GB/s): what parameter offload moves its weights through
    compiler: bool = False  # Triton is there and serves this card: torch.compile can generate its kernels
    card: Optional[Card] = None  # the card planned for (cards.py); None: the CPU, or the reference card's rates
    emulated: bool = False  # a bigger card here plays `card`: its missing kernels and dtypes off, memory capped
    flash_attn: bool = False  # the flash-attn package is installed

    @property
    def world(self) -> int:
        return self.per_node * self.nodes

    @property
    def capped(self) -> bool:
        return self.cap_gib is not None


def detect_cards(cap_gib: Optional[float], world: int, per_node: int, card_name: str = "auto") -> Cards:
    """This rank's view of its card (call after the process has its device; the ranks then agree on the
    smallest, see run.plan_run), or of the card it plays (`card_name`: capped to that card's memory, its own
    host link). Without CUDA: the node's available RAM shared by its ranks."""
    import torch

    nodes = max(1, world // max(per_node, 1))
    if not torch.cuda.is_available():
        from .hostmem import node_memory_gib

        return Cards(per_node, nodes, node_memory_gib()[0] / per_node, None, "cpu")
    card, emulated = resolve_card(card_name, detected_card())
    cap_gib = run_cap_gib(card_name, cap_gib)
    free, _ = torch.cuda.mem_get_info()
    usable = free / GiB if cap_gib is None else min(cap_gib, free / GiB)
    return named_cards(card, per_node, nodes, usable, cap_gib, card.host_gbps if emulated else host_to_gpu_gbps(),
                       emulated, importlib.util.find_spec("triton") is not None)


def named_cards(card: Card, per_node: int, nodes: int = 1, usable_gib: Optional[float] = None,
                cap_gib: Optional[float] = None, host_gbps: Optional[float] = None, emulated: bool = False,
                triton: bool = True) -> Cards:
    """Cards of a kind from the table (cards.py), e.g. to plan for a machine this is not. Without `usable_gib`:
    what PyTorch can allocate there (the card's memory less its context), as a cap."""
    if usable_gib is None:
        usable_gib = cap_gib = card.usable_gib
    return Cards(per_node, nodes, usable_gib, cap_gib, "cuda", host_gbps or card.host_gbps, triton and card.compiles,
                 card, emulated, importlib.util.find_spec("flash_attn") is not None)


def run_cap_gib(card_name: Optional[str], cap_gib: Optional[float]) -> Optional[float]:
    """The per-process memory cap of a run, known before CUDA starts: --gpu_memory_cap_gib, and a named card's
    usable memory (cards.py)."""
    if card_name in (None, "", "auto"):
        return cap_gib
    usable = card_named(card_name).usable_gib
    return usable if cap_gib is None else min(cap_gib, usable)


def host_to_gpu_gbps(nbytes: int = 256 * 1024 ** 2) -> float:
    """Pinned host-to-GPU copy rate of this machine (GB/s), from three copies of 256 MiB (~0.1 s)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    rate = 3 * nbytes / (start.elapsed_time(end) / 1e3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rate


def env_settings(cap_gib: Optional[float], world: int) -> tuple[str, Optional[int]]:
    """(PYTORCH_CUDA_ALLOC_CONF, NCCL_MAX_NCHANNELS) of a run, from what is known before CUDA starts (both are
    read at the first allocation and the first collective). Expandable segments always: without them
    ZeRO-3's changing gather sizes fragment the cache by GBs (14B at 4,096 OOMed under a 22 GiB cap without,
    fitted with). The cache's collection where a per-process cap lets it act (-1.2 GiB reserved); fewer NCCL
    channels on capped, small ranks (-0.8 GiB outside PyTorch on NVLink; a PCIe box gets few by itself)."""
    alloc = "expandable_segments:True"
    if cap_gib is not None:
        alloc += ",garbage_collection_threshold:0.7"
    return alloc, (4 if cap_gib is not None and cap_gib < 32 and world > 1 else None)


@dataclass(frozen=True)
class Plan:
    zero_stage: int  # 1 (or 2, where pinned): the frozen base whole on every GPU; 3: partitioned across the GPUs
    whole_layers: bool  # ZeRO-3: one gather per decoder layer instead of one per Linear
    recompute_layers: int  # the first N decoder layers are recomputed in backward, the others keep activations
    checkpoints_on_cpu: bool  # the recomputed layers' inputs wait in pinned host memory
    offload_param: bool  # ZeRO-3: the frozen base in host RAM, fetched layer by layer
    hpz_partition: int  # ZeRO-3 across nodes: a secondary copy partitioned inside each node (1: off)
    compile_layers: bool  # base whole: each decoder layer's forward and backward compiled (torch.compile)
    packing: bool  # several samples per row: the user's choice (it changes what a step trains on), recorded
    alloc_conf: str  # PYTORCH_CUDA_ALLOC_CONF
    nccl_max_channels: Optional[int]  # NCCL_MAX_NCHANNELS (fewer channels: less memory outside PyTorch)
    card: Optional[str] = None  # the card planned for (cards.py); None: the CPU
    emulated: bool = False  # a bigger card plays `card`: what it lacks switched off, memory capped
    dtype: str = "float16"  # the run's precision: float16, bfloat16, float32 (the CPU)
    attention: str = "sdpa"  # transformers' attention implementation (sdpa: GQA in the kernel; sdpa_expanded_kv)
    sdpa_flash: bool = True  # SDPA's flash kernel may run (sm80+, not emulating an older card); cuDNN's never
    fused_kernels: bool = False  # the lean norms and gate as compiled kernels (op by op where layers compile)
    gpu_memory_cap_gib: Optional[float] = None  # PyTorch's memory per process (--gpu_memory_cap_gib, a named card)
    trainable_numel: int = 0  # caps ZeRO's gradient bucket (0: the DeepSpeed file's)
    layer_numel: int = 0  # ZeRO-3 whole-layer gathers: what two layers live and one reused mean in elements

    @property
    def pad_to(self) -> int:
        """Each micro-step's positions are right-padded to a multiple of this (unlabelled pads after the real positions:
        exact under causal attention). Compiled layers specialise their graphs on a length's remainder by 8; padded,
        one graph serves every micro-step (RESULTS.md "One graph for every layer and length")."""
        return 8 if self.compile_layers else 1

    @property
    def base_whole(self) -> bool:
        """The frozen base whole on every GPU (ZeRO-1 or -2): nothing is gathered, no hook runs inside a layer."""
        return self.zero_stage < 3

    def line(self, device: str = "GPU") -> str:
        """The plan in words; `device`: what a rank runs on ("process" for the CPU demo and tests)."""
        where = f"ZeRO-{self.zero_stage}" + (f" (base whole on each {device})" if self.base_whole else "")
        if self.zero_stage == 3:
            where += ", whole-layer gathers" if self.whole_layers else ", per-Linear gathers"
            where += ", base in host RAM" if self.offload_param else ""
            where += f", hpZ within nodes of {self.hpz_partition}" if self.hpz_partition > 1 else ""
        parts = [where, f"recompute {self.recompute_layers} layers"]
        if self.compile_layers:
            parts.append("compiled layers")
        if self.attention == EXPANDED_KV:
            parts.append("K/V expanded for SDPA")
        if self.recompute_layers and self.checkpoints_on_cpu:
            parts.append("checkpoints in host RAM")
        if self.packing:
            parts.append("packed")
        if self.emulated:
            parts.append(f"as a {self.card} ({self.gpu_memory_cap_gib:.1f} GiB)")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)

    def flags(self) -> str:
        """The training options that pin this plan."""
        out = f"--zero_stage {self.zero_stage} --recompute_layers {self.recompute_layers}"
        if self.zero_stage == 3:
            out += f" --gather_whole_layers {str(self.whole_layers).lower()} --offload {'param' if self.offload_param else 'none'}"
        if self.recompute_layers:
            out += f" --checkpoints_on_cpu {str(self.checkpoints_on_cpu).lower()}"
        if self.base_whole:
            out += f" --compile_layers {str(self.compile_layers).lower()}"
        return out


@dataclass(frozen=True)
class Pins:
    """What the user fixed (None: the plan decides)."""

    zero_stage: Optional[int] = None
    whole_layers: Optional[bool] = None
    recompute_layers: Optional[int] = None
    checkpoints_on_cpu: Optional[bool] = None
    offload_param: Optional[bool] = None
    compile_layers: Optional[bool] = None
    # what the run asks of the card, granted where the card has it (not a pin of the layout)
    attention: Optional[str] = None  # --attn_implementation
    fused_kernels: bool = True  # --fused_kernels (with --lean_activations)

    def pinned(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("attention", "fused_kernels")}


# ------------------------------------------------------------------------------------------------ memory

def weights_gib(plan: Plan, shape: Shape, world: int) -> float:
    """Frozen weights on one GPU at the backward's start: resident ones, the gathered ones in flight, and under
    ZeRO-3 the gathered weights of every layer that keeps its activations: torch's linear saves a view of the
    weight for the input's gradient, which keeps the gathered copy alive until the layer's backward
    (RESULTS.md "Plans": the out-of-memory run that showed it)."""
    if plan.base_whole:
        return shape.base_numel * shape.bytes_per_value / GiB
    return held_weights_gib(plan, shape, world) + live_numel(plan, shape) * shape.bytes_per_value / GiB


def live_numel(plan: Plan, shape: Shape) -> int:
    """Weights ZeRO-3 holds gathered for the running layer and the prefetched one."""
    return 2 * shape.layer_numel if plan.whole_layers else int(min(PER_LINEAR_LIVE, 2 * shape.layer_numel))


def held_weights_gib(plan: Plan, shape: Shape, world: int) -> float:
    """ZeRO-3's frozen weights on one GPU outside the gathering window: the resident partition and the kept
    layers' gathered copies (weights_gib says why those stay)."""
    kept = (shape.layers - plan.recompute_layers) * shape.layer_numel
    resident = 0.0 if plan.offload_param else shape.base_numel / world
    if plan.hpz_partition > 1 and not plan.offload_param:
        resident += shape.base_numel / plan.hpz_partition  # the secondary copy inside the node
    return (resident + kept) * shape.bytes_per_value / GiB + (OFFLOAD_FIXED_GIB if plan.offload_param else 0.0)


def activations_gib(plan: Plan, shape: Shape, positions: int) -> float:
    """What the layers keep for backward at its start: the first `recompute_layers` are recomputed, so the
    kept layers' backward runs first and frees their activations before any recompute; then one recomputed
    layer's activations are live at a time. Compiled layers keep the same as eager lean ones, within 0.4%
    (RESULTS.md "The launch-bound micro-step")."""
    return held_activations_gib(plan, shape, positions, max(shape.layers - plan.recompute_layers, 1))


def held_activations_gib(plan: Plan, shape: Shape, positions: int, layers_kept: Optional[int] = None) -> float:
    """What the kept layers (`layers_kept`, by default all not recomputed) and the checkpoints hold."""
    k = plan.recompute_layers
    kept = (shape.layers - k if layers_kept is None else layers_kept) * shape.kept_bytes_per_position(
        plan.attention == EXPANDED_KV)
    ckpt = 0 if plan.checkpoints_on_cpu else k * shape.checkpoint_bytes_per_position()
    return positions * (kept + ckpt) / GiB


def predict_peak_gib(plan: Plan, shape: Shape, world: int, positions: int) -> float:
    """Predicted peak allocated GiB per GPU of a micro-step of `positions` positions (micro-batch x longest): the
    larger of two moments. A layer's backward, with its weights gathered and the activations kept for backward;
    and, under parameter offload, the loss: the sliced vocabulary copies this rank's slice of lm_head from host
    memory to the GPU (fit/vocab_parallel.py) while no layer is gathered and every layer's activations are still
    held, none recomputed yet: with all 48 layers recomputed the loss is the peak (RESULTS.md "Plans")."""
    fixed = FIXED_GIB[plan.zero_stage] + positions * PER_POSITION_BYTES / GiB
    peak = weights_gib(plan, shape, world) + activations_gib(plan, shape, positions) + fixed
    if plan.zero_stage == 3 and plan.offload_param:
        head = shape.head_numel * shape.bytes_per_value / world / GiB
        at_loss = held_weights_gib(plan, shape, world) + head + held_activations_gib(plan, shape, positions) + fixed
        peak = max(peak, at_loss)
    return peak


def need_gib(peak_gib: float, cards: Cards) -> float:
    """What a predicted peak needs of a card: the allocator's cache on top, and the CUDA context where no
    cap covers it."""
    if cards.kind == "cpu":
        return peak_gib
    return peak_gib * (1 + RESERVED_OVER_ALLOCATED) + (0 if cards.capped else CONTEXT_GIB)


# ------------------------------------------------------------------------------------------------- speed

@dataclass(frozen=True)
class StepTime:
    """A micro-step on the planned card: its compute, and the bytes it moves between GPUs (ZeRO-3's gathers)
    and over the host link (parameter offload), which DeepSpeed prefetches on their own streams behind the
    compute. On a PCIe box both kinds of traffic share the host's lanes, so the links add up."""

    compute_s: float
    gpu_link_s: float = 0.0
    host_link_s: float = 0.0

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.gpu_link_s + self.host_link_s)

    @property
    def bound(self) -> str:
        if self.compute_s >= self.gpu_link_s + self.host_link_s:
            return "compute"
        return "GPU link" if self.gpu_link_s >= self.host_link_s else "host link"


def step_flops(shape: Shape, positions: int, recomputed_share: float) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of a LoRA micro-step: frozen Linears need no weight gradients, so forward 2N and
    the input gradient 2N per position, and the recomputed share's forward again; causal attention 2 T^2 h a
    layer forward, twice that backward."""
    h, kv, inter, n = shape.hidden, shape.kv_dim, shape.intermediate, shape.layers
    linear = n * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attention = 2 * positions * positions * h * n
    return (4 + 2 * recomputed_share) * linear * positions, (3 + recomputed_share) * attention


def reference_seconds(plan: Plan, shape: Shape, positions: int, family: Optional[str] = None) -> float:
    """Seconds per micro-step of `plan`'s compute on the reference card (1 x H200, flash attention), interpolated
    in length and in the share of layers recomputed; `family`: the table's row to read (default: the plan's)."""
    family = family or ("whole" if plan.base_whole else ("layers" if plan.whole_layers else "linear"))
    lo, hi = sorted(STEP_S)
    x = min(max((positions - lo) / (hi - lo), 0.0), 1.0)
    share = plan.recompute_layers / shape.layers
    at = {n: t[0] + share * (t[1] - t[0]) for n, t in ((n, STEP_S[n][family]) for n in (lo, hi))}
    s = at[lo] + x * (at[hi] - at[lo])
    s *= positions / (lo + x * (hi - lo))  # beyond the table's lengths, time follows length
    if plan.checkpoints_on_cpu and plan.recompute_layers:
        s *= HOST_CHECKPOINTS_FACTOR
    if plan.compile_layers:
        s *= COMPILED_STEP_RATIO[lo] + x * (COMPILED_STEP_RATIO[hi] - COMPILED_STEP_RATIO[lo])
    return s


def step_time(plan: Plan, shape: Shape, cards: Cards, positions: int) -> StepTime:
    """A micro-step of `plan` on `cards` (the reference card's rates where none is named). Compute: the
    reference time of the GPU's work (the base-whole row) split into GEMMs, attention (at the rate of the kernel
    the plan's attention runs on) and the rest (elementwise: memory bandwidth), each scaled to the card, plus
    what ZeRO-3 adds on the reference card (its hooks on the host: not scaled). Links: per pass over the layers, each rank
    receives the other ranks' share of every decoder layer (ZeRO-3), or brings its own share from host memory
    (parameter offload; and the loss's vocabulary slice); two passes (forward, recompute + backward), per-Linear
    gathers a recomputed layer once more."""
    ref, card = CARDS[REFERENCE_CARD], cards.card or CARDS[REFERENCE_CARD]
    share = plan.recompute_layers / shape.layers
    gemm, attention = step_flops(shape, positions, share)
    kernel = "memory-efficient" if plan.attention == EXPANDED_KV else "flash"
    ref_s = reference_seconds(plan, shape, positions, "whole")
    overhead = reference_seconds(plan, shape, positions) - ref_s
    ref_gemm = gemm / (ref.fp16_tflops * 1e12 * GEMM_SHARE)
    ref_attention = attention / (ref.fp16_tflops * 1e12 * ATTENTION_SHARE["flash"])
    other = max(ref_s - ref_gemm - ref_attention, 0.0)
    on_card = (gemm / (card.fp16_tflops * 1e12 * GEMM_SHARE) + attention / (card.fp16_tflops * 1e12 * ATTENTION_SHARE[kernel])
               + other * ref.memory_gbps / card.memory_gbps)
    compute = ref_s * on_card / (ref_gemm + ref_attention + other) + overhead
    if plan.base_whole:
        return StepTime(compute)
    passes = 2 + (0 if plan.whole_layers else share)
    layers_bytes = shape.layers * shape.layer_numel * shape.bytes_per_value
    group = cards.per_node if plan.hpz_partition > 1 else cards.world
    gpu = passes * layers_bytes * (group - 1) / group / (card.peer_gbps * 1e9) if not plan.offload_param else 0.0
    host = 0.0
    if plan.offload_param:
        host = (passes * layers_bytes + shape.head_numel * shape.bytes_per_value) / cards.world / (cards.host_gbps * 1e9)
    return StepTime(compute, gpu, host)


def step_seconds(plan: Plan, shape: Shape, cards: Cards, positions: int) -> float:
    return step_time(plan, shape, cards, positions).total_s


def job_time(plan: Plan, shape: Shape, cards: Cards, lockstep: list[int]) -> tuple[float, str]:
    """(seconds, what bounds most of them) of a run's micro-steps (`lockstep`: each one's positions, the longest
    rank's), compiling included; loading and saving left out."""
    times = {n: step_time(plan, shape, cards, n) for n in set(lockstep)}
    total = sum(times[n].total_s for n in lockstep) + (COMPILE_S if plan.compile_layers else 0.0)
    by_bound: dict[str, float] = {}
    for n in lockstep:
        by_bound[times[n].bound] = by_bound.get(times[n].bound, 0.0) + times[n].total_s
    return total, max(by_bound, key=by_bound.get)


# ------------------------------------------------------------------------------------------------ choice

@dataclass(frozen=True)
class Candidate:
    plan: Plan
    peak_gib: float
    need_gib: float
    step_s: float
    fits: bool
    why: str = ""
    job: Optional[tuple[float, str]] = None  # the whole run's seconds and its bound (with_job_times)


REFERENCE = dict(zero_stage=3, whole_layers=False, checkpoints_on_cpu=False, offload_param=False)


def reference_plan(layers: int) -> Plan:
    """The plan every other is tested against: ZeRO-3, per-Linear gathers, every layer recomputed."""
    alloc, nccl = env_settings(None, 1)
    return Plan(**REFERENCE, recompute_layers=layers, compile_layers=False, hpz_partition=1, packing=False,
                alloc_conf=alloc, nccl_max_channels=nccl)


def choose(shape: Shape, cards: Cards, positions: int, pins: Pins, packing: bool = False,
           mode: str = "auto", micro_steps: Optional[int] = None, trainable_numel: int = 0,
           dtype: Optional[str] = None) -> tuple[Plan, list[Candidate]]:
    """The plan of a run and every candidate weighed, best first. `mode` "reference": the plan every other is
    tested against (ZeRO-3, per-Linear gathers, every layer recomputed), pins applied on top. `micro_steps`: how
    many the run has per rank (None: many), which decides whether compiling the layers pays. `trainable_numel`:
    what ZeRO's gradient bucket needs at most (0: the DeepSpeed file's bucket). `dtype`: the run's precision (None:
    float16, or float32 where values take 4 bytes)."""
    pinned = pins.pinned()
    n = shape.layers
    execution = _execution(shape, cards, pins, trainable_numel, dtype)
    if mode == "reference":
        fields = {**REFERENCE, "recompute_layers": n, **pinned}
        plan = _finish(fields, cards, shape, packing, positions, micro_steps, execution)
        c = _candidate(plan, shape, cards, positions)
        return plan, [replace(c, why="the reference plan (--plan reference)")]
    rows = []
    # The base whole: ZeRO-1, not 2: partitioning LoRA's 17 MB of gradients saves nothing and costs a Python hook
    # per trainable tensor every micro-step (RESULTS.md "ZeRO-1 for the base whole"). Stage 2 where pinned.
    for stage in ((pinned["zero_stage"],) if "zero_stage" in pinned else (1, 3)):
        for whole in ((False,) if stage < 3 else (True, False)):
            for offload in ((False,) if stage < 3 else (False, True)):
                for host in (False, True):
                    fields = dict(zero_stage=stage, whole_layers=whole, offload_param=offload, checkpoints_on_cpu=host,
                                  compile_layers=pinned.get("compile_layers"))
                    clash = [k for k, v in pinned.items() if k in fields and fields[k] != v]
                    if clash or (stage == 3 and pinned.get("compile_layers")) or (stage == 3 and not offload and cards.world == 1 and "zero_stage" not in pinned):
                        continue  # ZeRO-3 on one GPU holds the whole base too, with gathers: stage 1 does it faster
                    # host checkpoints exist only where layers are recomputed; with the base in host RAM every layer
                    # is recomputed: a recompute costs no transfer, a kept layer holds its weights (RESULTS.md "Plans")
                    ks = ([pinned["recompute_layers"]] if "recompute_layers" in pinned else
                          [n] if offload else range(int(host), n + 1))
                    if host and not all(ks) and "checkpoints_on_cpu" not in pinned:
                        continue
                    best = None
                    for k in ks:  # the fewest recomputed layers that fit: each one recomputed costs time
                        plan = _finish({**fields, "recompute_layers": k}, cards, shape, packing, positions, micro_steps,
                                       execution)
                        c = _candidate(plan, shape, cards, positions)
                        best = best or c
                        if c.fits:
                            best = c
                            break
                    rows.append(best)
    if not rows:
        raise ValueError("the pinned options leave no plan: " + ", ".join(f"{k}={v}" for k, v in pinned.items()))
    ok = sorted((c for c in rows if c.fits), key=lambda c: c.step_s / positions)
    bad = sorted((c for c in rows if not c.fits), key=lambda c: c.need_gib)
    if ok:
        chosen = ok[0]
        ranked = [replace(chosen, why="chosen: the fastest that fits")] + [
            replace(c, why=f"fits, {c.step_s / chosen.step_s:.2f}x the chosen step time") for c in ok[1:]]
    else:
        chosen = bad[0]  # nothing is predicted to fit: the smallest, and the first micro-step will tell
        ranked = []
    ranked += [replace(c, why=("chosen although predicted not to fit: nothing does" if c is chosen else "")
                       + (f"needs {c.need_gib:.1f} GiB per GPU of {cards.usable_gib:.1f} usable "
                          f"(margin {MARGIN:.0%})" if c is not chosen else "")) for c in bad]
    return chosen.plan, ranked


def _execution(shape: Shape, cards: Cards, pins: Pins, trainable_numel: int, dtype: Optional[str] = None) -> dict:
    """The plan's fields that follow from the card alone: precision, attention, kernels, memory cap, sizes."""
    card = cards.card if cards.kind == "cuda" else None
    sdpa_flash = card is None or card.sdpa_flash
    attention = choose_attention(card.capability if card else None, sdpa_flash, cards.flash_attn, pins.attention)
    dtype = dtype or ("float32" if shape.bytes_per_value == 4 else "float16")
    if dtype == "bfloat16" and card is not None and not card.bf16:
        raise ConfigError([f"bf16 is on, but a {card.name} has no bf16: run fp16 (--fp16 true, or fp16 in the DeepSpeed "
                           f"file)"])
    return dict(card=card.name if card else None, emulated=cards.emulated, dtype=dtype, attention=attention,
                sdpa_flash=sdpa_flash, fused_kernels=pins.fused_kernels and cards.kind == "cuda" and cards.compiler,
                gpu_memory_cap_gib=cards.cap_gib, trainable_numel=trainable_numel, layer_numel=shape.layer_numel)


def _finish(fields: dict, cards: Cards, shape: Shape, packing: bool, positions: int,
            micro_steps: Optional[int] = None, execution: Optional[dict] = None) -> Plan:
    """The settings that follow from the rest: hpZ where ZeRO-3 spans nodes and the base fits in one node's
    GPUs (the gathers then stay inside the node, only LoRA's gradients cross); compiled layers with the base whole on
    a GPU torch.compile can generate kernels for (ZeRO-3's hooks run inside a layer, between its Linears), where
    the run's micro-steps save more than compiling costs; the environment's settings."""
    fields = dict(fields)
    node_gib = cards.per_node * cards.usable_gib
    hpz = (cards.per_node if fields["zero_stage"] == 3 and not fields["offload_param"] and cards.nodes > 1
           and shape.base_numel * shape.bytes_per_value / GiB < 0.5 * node_gib else 1)
    compiled = fields.pop("compile_layers", None)
    if compiled and fields["zero_stage"] == 3:
        raise ValueError("--compile_layers true needs the base whole (--zero_stage 1 or 2): ZeRO-3 gathers weights "
                         "inside a layer")
    alloc, nccl = env_settings(cards.cap_gib, cards.world)
    plan = Plan(**fields, compile_layers=bool(compiled), hpz_partition=hpz, packing=packing, alloc_conf=alloc,
                nccl_max_channels=nccl, **(execution or _execution(shape, cards, Pins(), 0)))
    if compiled is None and plan.base_whole and cards.kind == "cuda" and cards.compiler:
        saved = step_seconds(plan, shape, cards, positions) - step_seconds(replace(plan, compile_layers=True), shape,
                                                                            cards, positions)
        plan = replace(plan, compile_layers=micro_steps is None or saved * micro_steps > COMPILE_S)
    if plan.compile_layers:  # Inductor fuses the lean functions' arithmetic itself
        plan = replace(plan, fused_kernels=False)
    return plan


def _candidate(plan: Plan, shape: Shape, cards: Cards, positions: int) -> Candidate:
    peak = predict_peak_gib(plan, shape, cards.world, positions)
    need = need_gib(peak, cards)
    return Candidate(plan, peak, need, step_seconds(plan, shape, cards, positions),
                     need <= cards.usable_gib * (1 - MARGIN))


def next_down(plan: Plan, peak_gib: float, ranked: list[Candidate], layers: int) -> Optional[Plan]:
    """The plan to try after `plan` (predicted at `peak_gib`) ran out of memory: the fastest of the candidates
    `choose` weighed (`ranked`) that is predicted to need less."""
    smaller = [c for c in ranked if c.peak_gib <= 0.9 * peak_gib]  # a step worth taking: a tenth less at least
    if not smaller and plan.recompute_layers < layers:
        return replace(plan, recompute_layers=layers)
    return min(smaller, key=lambda c: c.step_s).plan if smaller else None


def pinned_note(plan: Plan) -> Optional[str]:
    """A word on a pinned choice that costs speed for nothing, printed beside the plan: ZeRO-2 with the base whole
    (a ChatTS-Training user's ds_z2_config.json pins it)."""
    if plan.zero_stage == 2:
        return ("ZeRO-2 is pinned (--zero_stage or the DeepSpeed file): with LoRA, --zero_stage 1 holds the same memory "
                "and runs faster (ZeRO-2 hooks every gradient each micro-step; 1.04-1.12x on 1 x H200)")
    return None


def with_job_times(ranked: list[Candidate], shape: Shape, cards: Cards, lockstep: list[int]) -> list[Candidate]:
    """Each candidate with its predicted time for the whole run (`lockstep`: Sampler.lockstep_positions)."""
    return [replace(c, job=job_time(c.plan, shape, cards, lockstep)) for c in ranked]


def format_candidates(ranked: list[Candidate], positions: int, cards: Cards) -> str:
    noun = ("GPU", "GPUs") if cards.kind == "cuda" else ("CPU process", "CPU processes")
    card = cards.card.name if cards.card else None
    where = f"{cards.world} {card + ' ' if card else ''}{noun[cards.world > 1]}"
    head = (f"plans for {where} ({cards.per_node} per node x {cards.nodes}), {cards.usable_gib:.1f} GiB usable each"
            f"{' (capped)' if cards.capped else ''}, longest micro-step {positions} positions:")
    lines = [head]
    scale = f"on a {card}" if card else f"({REFERENCE_CARD} scale)"
    for c in ranked:
        job = f", job {c.job[0] / 60:.0f} min ({c.job[1]}-bound)" if c.job else ""
        lines.append(f"  {'*' if c.why.startswith('chosen') else ' '} {c.plan.line(noun[0]):<78} peak {c.peak_gib:5.1f} GiB, "
                     f"needs {c.need_gib:5.1f}, {c.step_s:5.2f} s/micro-step {scale}{job} - {c.why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the run's plan

def apply_to_ds(plan: Plan, ds: dict) -> dict:
    """The DeepSpeed config that carries out `plan` (precision, ZeRO stage, parameter offload, hpZ, the gradient
    bucket and whole-layer gather sizes): the one place a run's DeepSpeed dict is changed after it is read."""
    if plan.dtype != "float32":
        ds.setdefault("fp16", {})["enabled"] = plan.dtype == "float16"
        ds.setdefault("bf16", {})["enabled"] = plan.dtype == "bfloat16"
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = plan.zero_stage
    if plan.trainable_numel:
        # ZeRO allocates its gradient bucket whole (95 MiB in fp16 at 5e7 elements; DeepSpeed's default is 5e8) and
        # fills it with trainable weights' gradients only: for LoRA it never needs more than all of them.
        zero["reduce_bucket_size"] = min(int(zero.get("reduce_bucket_size", 5e8)), plan.trainable_numel)
    if plan.zero_stage == 3 and plan.whole_layers:
        # a gathered layer is kept from its recompute to its backward (reuse distance of one layer), and two may be
        # live so the next one arrives while one computes (training/engine.py, gather_whole_layers)
        zero["stage3_max_reuse_distance"] = max(int(zero.get("stage3_max_reuse_distance", 1e9)), int(1.1 * plan.layer_numel))
        zero["stage3_max_live_parameters"] = max(int(zero.get("stage3_max_live_parameters", 1e9)), int(2.2 * plan.layer_numel))
    if plan.zero_stage == 1:
        # Either one makes DeepSpeed's stage 1 hook every trainable tensor's gradient (stage_1_and_2.py), the
        # per-micro-step host cost stage 1 is chosen to avoid (choose); its one reduction per optimizer step
        # has nothing to overlap with.
        zero["overlap_comm"] = zero["contiguous_gradients"] = False
    if plan.zero_stage == 3 and plan.offload_param:
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    else:
        zero.pop("offload_param", None)
    if plan.hpz_partition > 1:
        zero["zero_hpz_partition_size"] = plan.hpz_partition
    return ds


def execute(plan: Plan) -> None:
    """The plan's process-wide switches, set once before the model is built (prepare_engine): the SDPA kernels the
    planned card has (attention.allow_sdpa_kernels)."""
    allow_sdpa_kernels(plan.sdpa_flash)


def apply_env(cap_gib: Optional[float], world: int) -> None:
    """The plan's allocator and NCCL settings (env_settings), where the environment does not set them already.
    Called before the process's first CUDA allocation and first collective."""
    alloc, nccl = env_settings(cap_gib, world)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", alloc)
    if nccl:
        os.environ.setdefault("NCCL_MAX_NCHANNELS", str(nccl))


def pins_of(cfg, ds_file: dict, layers: int) -> Pins:
    """What the options and the DeepSpeed file fix. `--gradient_checkpointing false` is 0 layers recomputed,
    `true` all of them; `--recompute_layers` says how many."""
    zero = ds_file.get("zero_optimization", {}) or {}
    stage = cfg.zero_stage if cfg.zero_stage is not None else zero.get("stage")
    offload = None
    if cfg.offload is not None:
        offload = cfg.offload in ("param", "all")
    elif "offload_param" in zero:
        offload = (zero["offload_param"] or {}).get("device", "none") not in ("none", None)
    recompute = cfg.recompute_layers
    if recompute is None and cfg.gradient_checkpointing is not None:
        recompute = layers if cfg.gradient_checkpointing else 0
    return Pins(zero_stage=None if stage in (None, "auto") else int(stage), whole_layers=cfg.gather_whole_layers,
                recompute_layers=recompute, checkpoints_on_cpu=cfg.checkpoints_on_cpu, offload_param=offload,
                compile_layers=cfg.compile_layers, attention=cfg.attn_implementation,
                fused_kernels=cfg.fused_kernels and cfg.lean_activations)


def trainable_numel(cfg, shape: Shape) -> int:
    """LoRA's weights for the run's targets and rank (8.65 M on 14B with r8 q/k/v), and the encoder's where it
    trains too (an upper bound for LoRA on it)."""
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    sides = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h, "gate_proj": h + inter,
             "up_proj": h + inter, "down_proj": inter + h}
    lora = shape.layers * cfg.lora_rank * sum(sides[t] for t in cfg.lora_target_list)
    return lora + (shape.encoder_numel if cfg.lora_encoder or cfg.train_encoder else 0)


def plan_for(cfg, ds: dict, config, cards: Cards, positions: int,
             micro_steps: Optional[int] = None) -> tuple[Plan, list[Candidate], Shape]:
    """The plan of a run with these options, DeepSpeed file and model config on these cards, every candidate
    weighed, and the model's shape: what training, memprobe and `chatts-train plan` all decide with."""
    from .dsconfig import precision

    dtype = precision(ds)
    shape = Shape.of(config, dtype.itemsize)
    plan, ranked = choose(shape, cards, positions, pins_of(cfg, ds, shape.layers), cfg.packing, cfg.plan, micro_steps,
                          trainable_numel(cfg, shape), str(dtype).removeprefix("torch."))
    return plan, ranked, shape


def plan_run(cfg, ds: dict, config, positions: int, world: int, device,
             micro_steps: Optional[int] = None) -> tuple[Plan, list[Candidate], Cards]:
    """The plan of this run, the same on every rank: each rank looks at its card, the smallest decides, and
    `choose` weighs the candidates for the longest micro-step (and the run's `micro_steps` per rank, None:
    many). Called after the process group is up and before the model loads (train()'s set-up and memprobe)."""
    import torch
    import torch.distributed as dist

    from .hostmem import ranks_on_this_node

    cards = detect_cards(cfg.gpu_memory_cap_gib, world, ranks_on_this_node(world), cfg.card)
    usable = torch.tensor([cards.usable_gib], dtype=torch.float64, device=device)
    dist.all_reduce(usable, op=dist.ReduceOp.MIN)
    cards = replace(cards, usable_gib=float(usable.item()))
    plan, ranked, _ = plan_for(cfg, ds, config, cards, positions, micro_steps)
    return plan, ranked, cards


__all__ = ["Cards", "Candidate", "Pins", "Plan", "Shape", "StepTime", "apply_env", "apply_to_ds", "choose", "detect_cards",
           "env_settings", "execute", "format_candidates", "job_time", "named_cards", "next_down", "pinned_note", "pins_of",
           "plan_for", "plan_run", "predict_peak_gib", "reference_plan", "run_cap_gib", "step_seconds", "step_time",
           "trainable_numel", "with_job_times"]
