"""Which images make up each global batch: per-source balanced, deterministic, resumable.

Appendix B of the PS3 paper draws every source with the same probability whatever its
size; we draw each of the global batch's slots from a source with probability
proportional to the spec weight (equal by default). Each source is an endless stream:
epoch e of source s is a permutation of its samples seeded by (seed, s, e) (a Feistel
bijection, so no per-sample table is held), so the whole
order is a function of (seed, position) and the state is just the step number plus one
read cursor per source and stream.

Section 2.3 composition: a fixed share of the slots (`global_fraction`, rounded) are
global pairs, drawn only from sources with global captions (from their own stream, so
local and global use of a source are independent); an image appears at most once per
global batch. Positions are global (per step, not per rank), so a resumed job with
another world size continues with exactly the same samples.
"""

from __future__ import annotations

import zlib
from collections.abc import Container
from dataclasses import dataclass, replace

import numpy as np

LOCAL, GLOBAL = 0, 1


class SamplingError(ValueError):
    """The sources cannot fill a global batch (e.g. fewer distinct images than slots)."""


@dataclass(frozen=True)
class SourceInfo:
    """What the planner needs of a source: its size and whether it has global captions."""

    name: str
    size: int
    weight: float = 1.0
    has_global: bool = False


@dataclass(frozen=True)
class Slot:
    """One place in a global batch: which image, used how, with its own random seed."""

    source: int  # index into the planner's sources
    index: int  # sample number within the source
    is_global: bool
    seed: int  # seeds the box choice and any bad-sample replacement of this slot
    position: int = 0  # place in the global batch
    batch_size: int = 1  # size of the global batch (stride of this slot's stand-ins)

    @property
    def key(self) -> tuple[int, int]:
        return self.source, self.index


class BatchPlanner:
    """Plans global batches one step after another; `state_dict()` is the exact position."""

    def __init__(self, sources: list[SourceInfo], global_batch: int, seed: int, global_fraction: float = 0.25):
        if not sources or any(s.size <= 0 for s in sources):
            raise SamplingError("every source needs at least one sample")
        if not 0.0 <= global_fraction <= 1.0:
            raise SamplingError(f"global_fraction must be in [0, 1], got {global_fraction}")
        self.sources, self.global_batch, self.seed = sources, global_batch, seed
        if len({s.name for s in sources}) != len(sources):
            raise SamplingError("source names must be unique (they key the resume state)")
        by_name = sorted(range(len(sources)), key=lambda i: sources[i].name)  # spec order must not matter
        glob = [i for i in by_name if sources[i].has_global]
        self.n_global = round(global_fraction * global_batch) if glob else 0
        self._pools = {LOCAL: by_name, GLOBAL: glob}
        self._ids = [zlib.crc32(s.name.encode()) for s in sources]  # streams survive reordering
        self.step = 0
        self.cursors = {s.name: [0, 0] for s in sources}
        self._perms: dict[tuple[int, int, int], FeistelPermutation] = {}

    # ---- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": {k: list(v) for k, v in self.cursors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for name, cur in state["cursors"].items():
            if name in self.cursors:  # a source removed from the spec is dropped
                self.cursors[name] = [int(cur[0]), int(cur[1])]

    # ---- planning ------------------------------------------------------------------
    def next_batch(self) -> list[Slot]:
        """The slots of the current step, in batch order; advances to the next step."""
        rng = np.random.default_rng([self.seed, self.step, 0x9E3779B9])
        kinds = [GLOBAL] * self.n_global + [LOCAL] * (self.global_batch - self.n_global)
        first = {kind: iter(self._choose(rng, self._pools[kind], kinds.count(kind))) for kind in (GLOBAL, LOCAL)}
        seeds = rng.integers(1 << 62, size=len(kinds))
        used: set[tuple[int, int]] = set()
        slots = []
        for kind, seed in zip(kinds, seeds.tolist()):
            src, idx = self._draw(rng, kind, next(first[kind]), used)
            used.add((src, idx))
            slots.append(Slot(src, idx, kind == GLOBAL, seed))
        order = rng.permutation(len(slots)).tolist()  # spread global pairs over ranks and micro-batches
        self.step += 1
        return [replace(slots[i], position=p, batch_size=len(slots)) for p, i in enumerate(order)]

    def _choose(self, rng: np.random.Generator, pool: list[int], n: int) -> list[int]:
        """n sources drawn from `pool` with probability proportional to weight (vectorised)."""
        if not pool or n == 0:
            return []
        weights = np.array([self.sources[i].weight for i in pool], dtype=float)
        return [pool[i] for i in rng.choice(len(pool), size=n, p=weights / weights.sum()).tolist()]

    def _draw(self, rng: np.random.Generator, kind: int, src: int, used: set) -> tuple[int, int]:
        idx = self._next_unused(src, kind, used)
        if idx is not None:
            return src, idx
        pool = [i for i in self._pools[kind] if i != src]  # every image of `src` is in the batch
        while pool:
            src = self._choose(rng, pool, 1)[0]
            idx = self._next_unused(src, kind, used)
            if idx is not None:
                return src, idx
            pool.remove(src)
        raise SamplingError(
            f"global batch {self.global_batch} needs more distinct images than the sources hold "
            f"({sum(s.size for s in self.sources)}); add data or lower train.globalBatch")

    def _next_unused(self, src: int, kind: int, used: set) -> int | None:
        cursor = self.cursors[self.sources[src].name]
        size = self.sources[src].size
        for _ in range(size):
            pos = cursor[kind]
            cursor[kind] += 1
            idx = self._perm(src, kind, pos // size)(pos % size)
            if (src, idx) not in used:
                return idx
        return None

    def _perm(self, src: int, kind: int, epoch: int) -> FeistelPermutation:
        key = (src, kind, epoch)
        if key not in self._perms:
            for old in [k for k in self._perms if k[:2] == (src, kind)]:
                del self._perms[old]  # streams only move forward: keep one epoch per stream
            self._perms[key] = FeistelPermutation(self.sources[src].size, [self.seed, self._ids[src], kind, epoch])
        return self._perms[key]


class FeistelPermutation:
    """A seeded bijection of range(size) evaluated one index at a time, in O(1) memory.

    A table from numpy's `permutation` would cost 4-8 bytes per sample per stream per
    process (GBs for 10M-image sources with several workers); a 4-round Feistel network
    over the next even power of two, cycle-walked back into range, needs four keys.
    """

    ROUNDS = 4

    def __init__(self, size: int, seed: list[int]):
        self.size = size
        bits = max(2, (size - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.SeedSequence(seed).generate_state(self.ROUNDS, dtype=np.uint64)]

    def _round(self, value: int, key: int) -> int:
        x = (value ^ key) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF  # splitmix64-style mixing
        x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 29)) & self.mask

    def __call__(self, i: int) -> int:
        if self.size == 1:
            return 0
        while True:  # cycle-walk: the domain is at most 4x size, so ~2 rounds on average
            left, right = i >> self.half, i & self.mask
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
            i = (left << self.half) | right
            if i < self.size:
                return i


def replacement(slot: Slot, attempt: int, size: int, used: Container[tuple[int, int]]) -> int:
    """A deterministic stand-in from the same source for a slot whose image was bad.

    Drawn at random (not from the stream, so stream positions stay global) among the
    images whose number is congruent to the slot's position modulo the batch size: two
    slots of a batch can never pick the same stand-in, without any coordination between
    ranks. Planned images and `used` are avoided. Only when the source is too small for
    that (size <= position) does it probe all images, where two bad slots may collide.
    """
    rng = np.random.default_rng([slot.seed, attempt])
    stride, first = slot.batch_size, slot.position
    count = (size - first + stride - 1) // stride if size > first else 0
    start = int(rng.integers(count)) if count else 0
    for k in range(count):
        idx = first + stride * ((start + k) % count)
        if (slot.source, idx) not in used:
            return idx
    start = int(rng.integers(size))
    for k in range(size):  # small source: probe forward from a random start
        idx = (start + k) % size
        if (slot.source, idx) not in used:
            return idx
    return start
