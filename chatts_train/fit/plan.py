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

GiB = 1024 ** 3
# Room kept free on a card beside the predicted peak: the allocator's cache over what tensors hold (8-9%
# measured with expandable segments, HISTORY.md section 8) and the stated margin of the choice.
RESERVED_OVER_ALLOCATED = 0.10
MARGIN = 0.05
# Memory a CUDA process holds outside PyTorch's allocator (context, cuBLAS workspace, NCCL buffers):
# 1.3-2.1 GiB per rank measured on H200 (HISTORY.md sections 7-8); a capped run's cap does not cover it.
CONTEXT_GIB = 1.5


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
        return cls(n, h, inter, kv, base, layer, bytes_per_value, config.vocab_size * h)

    def kept_bytes_per_position(self) -> int:
        """What one decoder layer keeps for backward per position when it is not recomputed (lean activations,
        LoRA on q/k/v, frozen Linears keep no input): both norms' inputs, LoRA's input, q, k, v and the
        attention output for the fused attention kernel's backward, the MLP's gate and up."""
        h, kv, inter = self.hidden, self.kv_dim, self.intermediate
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
    compiler: bool = False  # Triton is there: torch.compile can generate this card's kernels

    @property
    def world(self) -> int:
        return self.per_node * self.nodes

    @property
    def capped(self) -> bool:
        return self.cap_gib is not None


def detect_cards(cap_gib: Optional[float], world: int, per_node: int) -> Cards:
    """This rank's view of its card (call after the process has its device; the ranks then agree on the
    smallest, see run.plan_run). Without CUDA: the node's available RAM shared by its ranks."""
    import torch

    nodes = max(1, world // max(per_node, 1))
    if not torch.cuda.is_available():
        from .hostmem import node_memory_gib

        return Cards(per_node, nodes, node_memory_gib()[0] / per_node, None, "cpu")
    free, _ = torch.cuda.mem_get_info()
    usable = free / GiB if cap_gib is None else min(cap_gib, free / GiB)
    return Cards(per_node, nodes, usable, cap_gib, "cuda", host_to_gpu_gbps(), importlib.util.find_spec("triton") is not None)


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
        if self.recompute_layers and self.checkpoints_on_cpu:
            parts.append("checkpoints in host RAM")
        if self.packing:
            parts.append("packed")
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

    def pinned(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ------------------------------------------------------------------------------------------------ memory

# Calibrated against memprobe on 1 x H200 (benchmarks/gpu_variants.sh, RESULTS.md "Plans"): what a step
# holds beside weights and kept activations (LoRA's weights, gradients and Adam state, the loss's
# vocabulary chunks, the backward's transients), as a fixed part and a part per position.
FIXED_GIB = {1: 0.55, 2: 0.55, 3: 0.45}  # ZeRO-1 holds LoRA's gradients whole: 17 MB on 14B
PER_POSITION_BYTES = 40_000
# ZeRO-3 per-Linear gathers keep up to stage3_max_live_parameters gathered (ds_config.json: 3e8)
PER_LINEAR_LIVE = 3e8


# ZeRO-3 with parameter offload holds ~1 GiB more on the GPU whatever the world size (0.89-1.05 GiB over the
# rest of this model in three runs: 1 and 2 GPUs, 2,158 and 4,096 positions; RESULTS.md "Plans")
OFFLOAD_FIXED_GIB = 1.0


def weights_gib(plan: Plan, shape: Shape, world: int) -> float:
    """Frozen weights on one GPU at the backward's start: resident ones, the gathered ones in flight, and under
    ZeRO-3 the gathered weights of every layer that keeps its activations: torch's linear saves a view of the
    weight for the input's gradient, and that view keeps the gathered copy alive until the layer's backward
    (measured: ZeRO-3 with offload and no layer recomputed ran out of memory under a 24 GiB cap at 2,158
    positions, predicted 13.7 GiB without this term)."""
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
    layer's activations are live at a time. Compiled layers keep the same as eager lean ones (Inductor's
    partitioner picks what to keep; measured 48.88 / 48.69 GiB at 4,096 and 36.27 / 36.19 at 1,600, compiled /
    eager, none recomputed)."""
    return held_activations_gib(plan, shape, positions, max(shape.layers - plan.recompute_layers, 1))


def held_activations_gib(plan: Plan, shape: Shape, positions: int, layers_kept: Optional[int] = None) -> float:
    """What the kept layers (`layers_kept`, by default all not recomputed) and the checkpoints hold."""
    k = plan.recompute_layers
    kept = (shape.layers - k if layers_kept is None else layers_kept) * shape.kept_bytes_per_position()
    ckpt = 0 if plan.checkpoints_on_cpu else k * shape.checkpoint_bytes_per_position()
    return positions * (kept + ckpt) / GiB


def predict_peak_gib(plan: Plan, shape: Shape, world: int, positions: int) -> float:
    """Predicted peak allocated GiB per GPU of a micro-step of `positions` positions (micro-batch x longest): the
    larger of two moments. A layer's backward, with its weights gathered and the activations kept for backward;
    and, under parameter offload, the loss: the sliced vocabulary copies this rank's slice of lm_head from host
    memory to the GPU (fit/vocab_parallel.py) while no layer is gathered and every layer's activations are still
    held, none recomputed yet. With all 48 layers recomputed the loss is the peak (measured on 1 x H200 with
    offload: 3.70 / 2.98 GiB at 1,600 positions with the checkpoints on the GPU / in host RAM, 4.92 / 3.08 at
    4,096; the layers' backward alone predicts 3.43 / 2.70 at 1,600)."""
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

# Seconds per micro-step on 1 x H200, ChatTS-14B, fp16, memprobe, for each way of holding the base: (no layer
# recomputed, all 48 recomputed). Base whole: measured at ZeRO-2 2026-12-01 (RESULTS.md "Plans", gpu_variants.sh
# probe_*); ZeRO-1, which the chooser runs instead, measured 1.04-1.12x faster in the loop (2026-12-02).
# ZeRO-3 with all recomputed: issue 17's table, same card and day. ZeRO-3 with none recomputed was not
# measured: ZeRO-2's ratio of the two (0.65 at 1,600, 0.68 at 4,096) is applied.
STEP_S = {
    1600: {"whole": (0.272, 0.416), "layers": (0.479, 0.733), "linear": (0.90, 1.38)},
    4096: {"whole": (0.487, 0.712), "layers": (0.493, 0.72), "linear": (1.02, 1.489)},
}
HOST_CHECKPOINTS_FACTOR = 1.10  # the recomputed layers' inputs to host memory and back (+10% at 4,096)
# Compiled layers (ZeRO-2) against the same plan run op by op, by length: Inductor's kernels, and no Python
# between them. memprobe on the 14B folder, nothing recomputed, 1 x H200, one lease: 0.194 / 0.272 s at 1,600,
# 0.467 / 0.514 s at 4,096 (RESULTS.md "The launch-bound micro-step", gpu_variants.sh probe_compiled_k0, probe_eager_k0).
COMPILED_STEP_RATIO = {1600: 0.711, 4096: 0.909}
# What compiling costs, once, in the first micro-step: 56-65 s for the 14B layers on 1 x H200's 16-core host (the
# same lease). The plan compiles where the run's micro-steps save more than that.
COMPILE_S = 60.0


def step_seconds(plan: Plan, shape: Shape, cards: Cards, positions: int) -> float:
    """Predicted seconds per micro-step on the reference card (ranking only: it is the ratios that count),
    interpolated in length and in the share of layers recomputed. Parameter offload adds its copies at this
    machine's host-to-GPU rate, as if unhidden: each pass over the layers (forward, backward) brings this
    rank's share of the base across (on PCIe 3.0 ~2.3 s a micro-step for 14B on 2 GPUs). On H200 much of it
    hides behind compute (measured 1.41 s a micro-step against 2.3 predicted): an upper bound that ranks
    offload last, as it should be."""
    family = "whole" if plan.base_whole else ("layers" if plan.whole_layers else "linear")
    lo, hi = sorted(STEP_S)
    x = min(max((positions - lo) / (hi - lo), 0.0), 1.0)
    share = plan.recompute_layers / shape.layers
    at = {n: t[0] + share * (t[1] - t[0]) for n, t in ((n, STEP_S[n][family]) for n in (lo, hi))}
    s = at[lo] + x * (at[hi] - at[lo])
    s *= positions / (lo + x * (hi - lo))  # beyond the table's lengths, time follows length
    if plan.offload_param:  # per-Linear gathers fetch a recomputed layer again for its backward
        passes = 2 + (0 if plan.whole_layers else share)
        s += passes * shape.base_numel * shape.bytes_per_value / cards.world / (cards.host_gbps * 1e9)
    if plan.checkpoints_on_cpu and plan.recompute_layers:
        s *= HOST_CHECKPOINTS_FACTOR
    if plan.compile_layers:
        s *= COMPILED_STEP_RATIO[lo] + x * (COMPILED_STEP_RATIO[hi] - COMPILED_STEP_RATIO[lo])
    return s


# ------------------------------------------------------------------------------------------------ choice

@dataclass(frozen=True)
class Candidate:
    plan: Plan
    peak_gib: float
    need_gib: float
    step_s: float
    fits: bool
    why: str = ""


REFERENCE = dict(zero_stage=3, whole_layers=False, checkpoints_on_cpu=False, offload_param=False)


def reference_plan(layers: int) -> Plan:
    """The plan every other is tested against: ZeRO-3, per-Linear gathers, every layer recomputed."""
    alloc, nccl = env_settings(None, 1)
    return Plan(**REFERENCE, recompute_layers=layers, compile_layers=False, hpz_partition=1, packing=False,
                alloc_conf=alloc, nccl_max_channels=nccl)


def choose(shape: Shape, cards: Cards, positions: int, pins: Pins, packing: bool = False,
           mode: str = "auto", micro_steps: Optional[int] = None) -> tuple[Plan, list[Candidate]]:
    """The plan of a run and every candidate weighed, best first. `mode` "reference": the plan every other is
    tested against (ZeRO-3, per-Linear gathers, every layer recomputed), pins applied on top. `micro_steps`: how
    many the run has per rank (None: many), which decides whether compiling the layers pays."""
    pinned = pins.pinned()
    n = shape.layers
    if mode == "reference":
        fields = {**REFERENCE, "recompute_layers": n, **pinned}
        plan = _finish(fields, cards, shape, packing, positions, micro_steps)
        c = _candidate(plan, shape, cards, positions)
        return plan, [replace(c, why="the reference plan (--plan reference)")]
    rows = []
    # The base whole: ZeRO-1, not 2. LoRA's gradients are small (17 MB on 14B), so partitioning them saves
    # nothing, and ZeRO-2 pays for it on the host every micro-step: a Python hook per trainable tensor (288 on
    # 14B, ~29 ms a micro-step on 1 x H200) copying each gradient into its bucket. ZeRO-1 leaves them to
    # autograd and reduces once per optimizer step. Stage 2 runs where it is pinned.
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
                    # is recomputed: whole-layer gathers fetch a layer once for its recompute and backward, so
                    # recompute costs no transfer, and a kept layer holds its weights (measured under a 24 GiB
                    # cap: all 48 recomputed 1,145 tokens/s, 24 of them 961)
                    ks = ([pinned["recompute_layers"]] if "recompute_layers" in pinned else
                          [n] if offload else range(int(host), n + 1))
                    if host and not all(ks) and "checkpoints_on_cpu" not in pinned:
                        continue
                    best = None
                    for k in ks:  # the fewest recomputed layers that fit: each one recomputed costs time
                        plan = _finish({**fields, "recompute_layers": k}, cards, shape, packing, positions, micro_steps)
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


def _finish(fields: dict, cards: Cards, shape: Shape, packing: bool, positions: int,
            micro_steps: Optional[int] = None) -> Plan:
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
                nccl_max_channels=nccl)
    if compiled is None and plan.base_whole and cards.kind == "cuda" and cards.compiler:
        saved = step_seconds(plan, shape, cards, positions) - step_seconds(replace(plan, compile_layers=True), shape,
                                                                            cards, positions)
        plan = replace(plan, compile_layers=micro_steps is None or saved * micro_steps > COMPILE_S)
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


def format_candidates(ranked: list[Candidate], positions: int, cards: Cards) -> str:
    noun = ("GPU", "GPUs") if cards.kind == "cuda" else ("CPU process", "CPU processes")
    where = f"{cards.world} {noun[cards.world > 1]}"
    head = (f"plans for {where} ({cards.per_node} per node x {cards.nodes}), {cards.usable_gib:.1f} GiB usable each"
            f"{' (capped)' if cards.capped else ''}, longest micro-step {positions} positions:")
    lines = [head]
    for c in ranked:
        lines.append(f"  {'*' if c.why.startswith('chosen') else ' '} {c.plan.line(noun[0]):<78} peak {c.peak_gib:5.1f} GiB, "
                     f"needs {c.need_gib:5.1f}, {c.step_s:5.2f} s/micro-step (H200 scale) - {c.why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the run's plan

def apply_to_ds(plan: Plan, ds: dict) -> dict:
    """The DeepSpeed config that carries out `plan` (ZeRO stage, parameter offload, hpZ)."""
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = plan.zero_stage
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
                compile_layers=cfg.compile_layers)


def plan_run(cfg, ds: dict, config, positions: int, world: int, device,
             micro_steps: Optional[int] = None) -> tuple[Plan, list[Candidate], Cards]:
    """The plan of this run, the same on every rank: each rank looks at its card, the smallest decides, and
    `choose` weighs the candidates for the longest micro-step (and the run's `micro_steps` per rank, None:
    many). Called after the process group is up and before the model loads (train()'s set-up and memprobe)."""
    import torch
    import torch.distributed as dist

    from .dsconfig import precision
    from .hostmem import ranks_on_this_node

    shape = Shape.of(config, precision(ds).itemsize)
    cards = detect_cards(cfg.gpu_memory_cap_gib, world, ranks_on_this_node(world))
    usable = torch.tensor([cards.usable_gib], dtype=torch.float64, device=device)
    dist.all_reduce(usable, op=dist.ReduceOp.MIN)
    cards = replace(cards, usable_gib=float(usable.item()))
    plan, ranked = choose(shape, cards, positions, pins_of(cfg, ds, shape.layers), cfg.packing, cfg.plan, micro_steps)
    return plan, ranked, cards


__all__ = ["Cards", "Candidate", "Pins", "Plan", "Shape", "apply_env", "apply_to_ds", "choose", "env_settings",
           "format_candidates", "next_down", "pinned_note", "pins_of", "plan_run", "predict_peak_gib", "reference_plan",
           "step_seconds"]
