"""Which samples each rank trains on in each micro-step: deterministic from (seed, epoch), so a resumed run
sees exactly the data order of an uninterrupted one.

An epoch is a list of micro-batches: `micro_batch` consecutive samples of the shuffled epoch order, or with
packing, consecutive samples joined while their expanded lengths fit the cutoff (one packed row; ZeRO-3
then gathers the weights once for several samples). Each optimizer step takes world x accumulation
micro-batches; the last step of an epoch wraps around to the epoch's start so every step is full and all
ranks run the same number of micro-steps (as torch's DistributedSampler pads).

The first epoch's longest micro-batch trades places with its first one: the run's first micro-step is its
most memory-hungry, so a plan that does not fit fails in the first minute, not hours in.
"""
from __future__ import annotations

import math

import numpy as np

from .indexing import DataIndex, epoch_order


def pack_plan(lengths: np.ndarray, order: np.ndarray, cutoff: int) -> list[np.ndarray]:
    """Consecutive samples of `order` grouped so that each group's total length is at most `cutoff`."""
    packs, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > cutoff:
            packs.append(np.array(current))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(np.array(current))
    return packs


class Sampler:
    def __init__(self, index: DataIndex, train_ids: np.ndarray, seed: int, micro_batch: int, world: int,
                 grad_accum: int, pack_to: int = 0):
        self.index, self.train_ids, self.seed = index, train_ids, seed
        self.micro_batch, self.world, self.grad_accum, self.pack_to = micro_batch, world, grad_accum, pack_to
        self._plans: dict[int, list[np.ndarray]] = {}
        self._steps: dict[int, int] = {}

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            order = epoch_order(self.index, self.train_ids, self.seed, epoch)
            if self.pack_to:
                plan = pack_plan(self.index.length, order, self.pack_to)
            else:
                plan = [order[i:i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
            if epoch == 0 and plan:
                worst = max(range(len(plan)), key=lambda u: self.positions(plan[u]))
                plan[0], plan[worst] = plan[worst], plan[0]
            self._plans = {epoch: plan}  # only the current epoch is kept
        return self._plans[epoch]

    def positions(self, ids: np.ndarray) -> int:
        """Positions of one micro-step: a pack is one row of its samples; a micro-batch is padded to its longest."""
        lengths = self.index.length[ids]
        return int(lengths.sum()) if self.pack_to else len(ids) * int(lengths.max())

    def longest(self, total_steps: int) -> int:
        """Positions of the longest micro-step of the run's `total_steps` optimizer steps."""
        last_epoch = self.locate(max(total_steps - 1, 0))[0]
        return max(self.positions(u) for e in range(last_epoch + 1) for u in self.epoch_plan(e))

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = math.ceil(len(self.epoch_plan(epoch)) / (self.world * self.grad_accum))
        return self._steps[epoch]

    def total_steps(self, num_epochs: float, max_steps: int = 0) -> int:
        if max_steps:
            return max_steps
        whole = int(num_epochs)
        total = sum(self.steps_in_epoch(e) for e in range(whole))
        return total + math.ceil((num_epochs - whole) * self.steps_in_epoch(whole)) if num_epochs > whole else total

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of a global optimizer step (0-based)."""
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """This rank's sample ids for each micro-step of optimizer step `step`."""
        epoch, in_epoch = self.locate(step)
        plan = self.epoch_plan(epoch)
        per_step = self.world * self.grad_accum
        units = [plan[i % len(plan)] for i in range(in_epoch * per_step, (in_epoch + 1) * per_step)]
        return [units[m * self.world + rank] for m in range(self.grad_accum)]

    def lockstep_positions(self, total_steps: int) -> list[int]:
        """Positions of each micro-step of the run as the ranks run it together (each its own micro-batch; a
        micro-step lasts as long as its longest rank's): what a job's time is predicted from."""
        return [max(self.positions(self.micro_batches(step, r)[m]) for r in range(self.world))
                for step in range(total_steps) for m in range(self.grad_accum)]

    def epoch_progress(self, step: int) -> float:
        """Epochs completed after optimizer step `step` (0-based), for logs."""
        epoch, in_epoch = self.locate(step)
        return epoch + (in_epoch + 1) / self.steps_in_epoch(epoch)
