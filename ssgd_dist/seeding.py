"""Named random streams: every random choice a run makes, derived from ``cfg.seed`` in one place.

A stream is the run seed plus a fixed offset, so two streams of one run never coincide and the same
(seed, stream, index) gives the same numbers on every rank, world size and restart. The offsets are
part of every published result: changing one changes the data order or the noise of every run.

Streams drawn per step or per epoch are *indexed*: SplitMix64 of (seed + offset, index), so
neighbouring indices give unrelated generators. The others are seeded once with seed + offset.
"""

from __future__ import annotations

import enum

import torch

_MASK64 = (1 << 64) - 1


class Stream(enum.IntEnum):
    """Offsets added to the run seed (values fixed since the first published results)."""

    NOISE = 0  # weight noise, indexed by optimizer step
    DATA_ORDER = 7919  # the permutation of each epoch, indexed by epoch
    AUGMENT = 104729  # crops and flips, indexed by step
    BN_RECALIBRATE = 15485863  # the training subset that recomputes BatchNorm statistics
    HESSIAN_POWER = 1  # flatness: start vector of the power iteration
    HESSIAN_TRACE = 2  # flatness: Hutchinson probes
    LANDSCAPE = 3  # flatness: the random landscape directions
    BENCH_DATA = 1000  # bench: random batches, seeded by rank


# Flatness draws a noise stream per perturbation radius; this keeps the radii's streams apart.
RADIUS_STRIDE = 1000003


def step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): neighbouring steps and seeds give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def stream_seed(stream: Stream, seed: int, index: int | None = None) -> int:
    """The integer seed of ``stream`` for run seed ``seed`` (and ``index`` for an indexed stream)."""
    base = seed + int(stream)
    return base if index is None else step_seed(base, index)


def generator(
    stream: Stream, seed: int, index: int | None = None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A private generator of ``stream``; it never touches the global RNG, which ranks consume differently."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(stream, seed, index))
    return gen


def seed_initial_weights(seed: int) -> None:
    """Seed the global RNG with the run seed before building a model: identical initial weights on every rank."""
    torch.manual_seed(seed)
