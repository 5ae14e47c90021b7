"""What the bench runs: the variants, and one variant's instrumented product step on one rank.

The step is the product's own (``Backend.train_step`` with the real methods and DDP backend); only
thin wrappers are added, to count the all-reduced bytes and time the noise work without changing it.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..backends.ddp import DDPBackend
from ..backends.fsdp import CountingAllGather, CountingReduceScatter, FSDPBackend, count_collectives
from ..bn import convert_batchnorm
from ..config import BenchOptions, Config, OptimConfig
from ..methods import METHODS, SGD, Pass, build_method
from ..optimizers import build_optimizer


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    batch_split: str | None = None
    restore: str = "copy"
    naive: bool = False  # every pass all-reduces
    micro_batches: int = 1  # sgd-ga2: two half-size micro-batches, no noise
    bn_mode: str = "local"  # BatchNorm statistics over this rank's samples, or (sync) every rank's

    def available(self, world_size: int, backend: str = "ddp") -> str | None:
        """None, or why this variant cannot run at this world size on this backend."""
        if self.method not in METHODS:
            return f"method {self.method!r} does not exist"
        if backend == "fsdp" and METHODS[self.method].needs_local_gradient:
            return f"{self.method} reads this rank's unreduced gradient, which FSDP2 keeps to itself"
        if self.batch_split == "paired" and world_size % 2:
            return f"'paired' needs an even number of ranks, not {world_size}"
        return None


VARIANTS = [
    Variant("sgd", "sgd"),
    Variant("sgd-ga2", "sgd", micro_batches=2),
    Variant("ssgd-halves", "ssgd", "halves"),
    Variant("ssgd-paired", "ssgd", "paired"),
    Variant("ssgd-full", "ssgd", "full"),
    Variant("ssgd-halves-regenerate", "ssgd", "halves", restore="regenerate"),
    Variant("ssgd-naive", "ssgd", "halves", naive=True),
    Variant("sam", "sam"),
    Variant("ssgd-halves-syncbn", "ssgd", "halves", bn_mode="sync"),
]
VARIANT_NAMES = [v.name for v in VARIANTS]


class GradientAccumulation(SGD):
    """Plain SGD over two micro-batches (the even and the odd half): ``halves`` without the noise."""

    name = "sgd-ga2"

    def passes(self) -> list[Pass]:
        return [Pass("even", 0.5), Pass("odd", 0.5)]


class NaiveDDPBackend(DDPBackend):
    """S-SGD as written by hand: no ``no_sync()``, so both passes all-reduce."""

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class NaiveFSDPBackend(FSDPBackend):
    """The same by hand on FSDP2: every pass reduce-scatters."""

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class CommCounter:
    """State of the counting comm hook: bytes and calls since the last ``take()``."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.bytes = 0
        self.calls = 0
        self.communicate = True  # False: a compute-only step (ranks then drift apart; timing only)

    def take(self) -> tuple[int, int]:
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out


def counting_allreduce(state, bucket):  # unannotated: DDP checks the annotations' types, and ours are strings
    """DDP's default all-reduce (average over ranks), counting the bytes it moves."""
    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size()
    state.calls += 1
    if not state.communicate:
        fut: torch.futures.Future = torch.futures.Future(devices=[buf.device] if buf.is_cuda else None)
        fut.set_result(buf)
        return fut
    buf.div_(state.world_size)
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])


class TimedMethod:
    """Wraps a method and accumulates the time of its noise work: ``before_pass`` and ``restore``.

    On CUDA the time comes from events read after the step's own synchronisation, so measuring adds
    no host sync to the step.
    """

    def __init__(self, method, device: torch.device):
        self.method = method
        self.cuda = device.type == "cuda"
        self._cpu_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __getattr__(self, name: str):
        return getattr(self.method, name)

    @contextlib.contextmanager
    def _timed(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_seconds += time.perf_counter() - t0

    def passes(self):
        return self.method.passes()

    def before_pass(self, index: int, step: int) -> None:
        with self._timed():
            self.method.before_pass(index, step)

    def restore(self) -> None:
        with self._timed():
            self.method.restore()

    def take_seconds(self) -> float:
        """Noise time since the last call; on CUDA only after the device has caught up."""
        seconds = self._cpu_seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1e3
        self._cpu_seconds, self._events = 0.0, []
        return seconds


class Runner:
    """One variant on one rank: its own copy of the model, optimizer, DDP wrapper and method."""

    def __init__(self, variant: Variant, base_model: nn.Module, opts: BenchOptions, rank: int, world_size: int):
        self.variant = variant
        device = next(base_model.parameters()).device
        self.device = device
        self.model = convert_batchnorm(copy.deepcopy(base_model), variant.bn_mode)
        cfg = Config(method=variant.method, seed=opts.seed, backend=opts.backend, optim=OptimConfig(lr=0.01))
        cfg.train.precision = opts.precision
        cfg.train.accumulation_steps = opts.accumulation_steps
        cfg.noise.restore = variant.restore
        if opts.backend == "fsdp":
            backend_cls = NaiveFSDPBackend if variant.naive else FSDPBackend
            self.backend = backend_cls.from_config(cfg, self.model, None)  # shards the model in place
            self.comm: CommCounter | CountingReduceScatter
            self.comm, self.gathers = count_collectives(self.model)
        else:
            optimizer = build_optimizer(cfg.optim, self.model.parameters())
            self.backend = (NaiveDDPBackend if variant.naive else DDPBackend).from_config(cfg, self.model, optimizer)
            self.comm = CommCounter(world_size)
            self.gathers: CountingAllGather | None = None  # DDP holds whole weights: nothing to gather
            self.backend.ddp.register_comm_hook(self.comm, counting_allreduce)
        if variant.batch_split:
            cfg.ssgd.batch_split = variant.batch_split
        method = (
            GradientAccumulation(cfg, self.model, rank, world_size)
            if variant.micro_batches == 2
            else build_method(cfg, self.model, rank, world_size)
        )
        self.method = TimedMethod(method, device)
        self.step = 0

    def run_steps(self, x: torch.Tensor, y: torch.Tensor, count: int = 1, communicate: bool = True) -> dict[str, float]:
        """``count`` consecutive steps, timed together: per-step time and noise time are their means.

        On CUDA nothing synchronises between them (the product's step reads nothing back), so the host
        queues a step while the device still runs the previous one, as in training; a lone step timed
        from an idle device would count every kernel launch of its first phase as device time.
        """
        cuda = self.device.type == "cuda"
        if isinstance(self.comm, CommCounter):
            self.comm.communicate = communicate
        self.model.train()
        if cuda:
            torch.cuda.synchronize(self.device)
        comm = []  # (bytes, calls) of each step: the hook runs on the host as the backward is queued
        gathered = 0
        t0 = time.perf_counter()
        for _ in range(count):
            self.backend.train_step(self.method, x, y, self.step)
            comm.append(self.comm.take())
            gathered = self.gathers.take()[0] if self.gathers else 0
            self.step += 1
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = (time.perf_counter() - t0) / count
        return {
            "step": seconds,
            "noise": self.method.take_seconds() / count,
            "bytes": comm[-1][0],
            "calls": comm[-1][1],
            "bytes_each": sorted({b for b, _ in comm}),
            "gathered_bytes": gathered,
        }
