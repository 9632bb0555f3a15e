"""The GPUs a run can be planned for: one table of each card's facts, which the plan reads.

`--card NAME` plans for that card; on a bigger one it also runs as it would run there (plan.Plan's emulation
fields): the kernels and dtypes it lacks switched off, PyTorch's memory capped to what the card leaves free.
`auto` is the card this process finds. Rates are data-sheet figures (dense fp16 tensor math with fp32
accumulate; memory bandwidth; links as x16 slots deliver them); the H200's are the measured ones where
RESULTS.md has them ("The users' cards": which inputs are measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # what the card has
    context_gib: float  # held outside PyTorch's allocator: CUDA context, cuBLAS workspace, NCCL buffers
    capability: tuple[int, int]
    fp16_tflops: float  # dense fp16 tensor math, fp32 accumulate
    memory_gbps: float
    host_gbps: float  # host <-> GPU copies (pinned), per card
    peer_gbps: float  # GPU <-> GPU, per direction (NVLink, or PCIe through the host)
    peer_link: str
    matches: tuple[str, ...] = ()  # how torch.cuda.get_device_name() spells it

    @property
    def usable_gib(self) -> float:
        """What PyTorch can allocate on the card."""
        return self.memory_gib - self.context_gib

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def sdpa_flash(self) -> bool:
        """PyTorch's flash (and cuDNN) SDPA kernels need sm80+."""
        return self.capability >= (8, 0)

    @property
    def compiles(self) -> bool:
        """torch.compile's kernels (compiled layers, fused norm and gate kernels) are measured on sm90 only;
        Triton's matmul and bf16 paths are weak or missing before sm80, so older cards run op by op."""
        return self.capability >= (8, 0)


CARDS = {c.name: c for c in (
    # The users' cards: 2080 Ti boards with 22 GB (2 x 11 GB stock), PCIe 3.0 x16, no P2P between GeForce cards
    Card("2080ti", 22.0, 0.6, (7, 5), 57.0, 616, 12.0, 10.0, "PCIe 3.0 through the host", ("2080 Ti",)),
    Card("3090", 24.0, 0.6, (8, 6), 71.0, 936, 24.0, 20.0, "PCIe 4.0 through the host", ("3090",)),
    Card("4090", 24.0, 0.6, (8, 9), 165.2, 1008, 24.0, 20.0, "PCIe 4.0 through the host", ("4090",)),
    Card("a100-40", 40.0, 1.0, (8, 0), 312.0, 1555, 24.0, 300.0, "NVLink 3", ("A100-SXM4-40GB", "A100-PCIE-40GB")),
    Card("a100-80", 80.0, 1.0, (8, 0), 312.0, 2039, 24.0, 300.0, "NVLink 3", ("A100-SXM4-80GB", "A100 80GB PCIe")),
    Card("h100", 79.6, 1.5, (9, 0), 989.0, 3350, 50.0, 450.0, "NVLink 4", ("H100",)),
    # memory as this project's H200s report it (143,771 MiB); host copies measured by the plan: 53-55 GB/s
    Card("h200", 140.4, 1.5, (9, 0), 989.0, 4800, 54.0, 450.0, "NVLink 4", ("H200",)),
)}
REFERENCE_CARD = "h200"  # the card the speed table was measured on


def card_named(name: str) -> Card:
    key = name.lower().replace(" ", "").replace("_", "-")
    if key not in CARDS:
        raise ConfigError([f"--card {name!r}: choose auto (this machine's card) or one of {', '.join(CARDS)}"])
    return CARDS[key]


def detected_card() -> Optional[Card]:
    """This process's CUDA card as the table knows it (an unknown card: its own memory and capability, the
    nearest known card's rates); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    name, props = torch.cuda.get_device_name(), torch.cuda.get_device_properties(torch.cuda.current_device())
    total = props.total_memory / 1024 ** 3
    found = [c for c in CARDS.values() if any(m in name for m in c.matches)]
    if found:  # the A100s by their memory
        return min(found, key=lambda c: abs(c.memory_gib - total))
    capability = (props.major, props.minor)
    nearest = min(CARDS.values(), key=lambda c: (abs(c.capability[0] - capability[0]), abs(c.memory_gib - total)))
    return Card(name, total, nearest.context_gib, capability, nearest.fp16_tflops, nearest.memory_gbps,
                nearest.host_gbps, nearest.peer_gbps, nearest.peer_link)


def resolve_card(name: str = "auto", here: Optional[Card] = None) -> tuple[Optional[Card], bool]:
    """(the card a run plans for, whether this machine plays it): `auto` is the card found here (None on the
    CPU); a named card smaller than the one here is emulated. `here`: the card found here, when known."""
    if name in (None, "", "auto"):
        return here, False
    card = card_named(name)
    if here is None or here.name == card.name:
        return card, False
    if card.capability > here.capability or card.memory_gib > here.memory_gib + 0.5:
        raise ConfigError([f"--card {card.name} on this {here.name}: a card can only play a smaller, older one; "
                           f"plan for it without running (`chatts-train plan --card {card.name}`)"])
    return card, True


__all__ = ["CARDS", "Card", "card_named", "detected_card", "resolve_card"]
