"""``ssgd-dist bench``: what S-SGD costs over SGD, measured in one run, and projected to many GPUs.

    ssgd-dist bench --model resnet20 --batch-size 256 --world-size 2 --device cpu --json bench.json
    ssgd-dist bench --model resnet20 --batch-size 1024 --world-size 1 --device cuda --precision bf16 --project

W ranks (gloo on CPU, NCCL on GPU) each build the same model once per variant and run the *product*
step (``Backend.train_step`` with the real methods and DDP backend); the variants' steps are
interleaved, so a slow moment of a shared machine hits them all alike. Per variant it reports the
median step time, the gradient bytes all-reduced per step (counted by a DDP comm hook), the peak
memory of the step, and the time spent drawing noise, perturbing and restoring. Two baselines make
the comparison fair: ``sgd`` and ``sgd-ga2`` (two half-size micro-batches, no noise: the same kernel
shapes as S-SGD ``halves``). ``ssgd-naive`` is S-SGD as a user writes it by hand: both passes
all-reduce.

``--project`` turns the measured compute time and gradient bytes into step times and scaling
efficiencies for 8 to 1024 GPUs under a ring all-reduce cost model. It is a model, labelled as such.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .backends.ddp import DDPBackend
from .config import Config, ConfigError, ModelConfig, OptimConfig
from .methods import METHODS, SGD, Pass, build_method
from .models import build_model
from .optimizers import build_optimizer
from .seeding import Stream, generator, seed_initial_weights

INPUT_SHAPES = {"mlp": (40,), "cnn1d": (40,)}  # MNIST-1D; the image models take CIFAR's (3, 32, 32)
NUM_CLASSES = 10
PROJECTION_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_BANDWIDTH_GBS = 25.0  # per-GPU all-reduce bus bandwidth across nodes: a 200 Gb/s NIC per GPU
DEFAULT_LATENCY_US = 50.0  # per all-reduce call (one DDP bucket) at cluster scale
DEFAULT_OVERLAP = 0.0  # fraction of all-reduce time hidden behind the backward: 0 is the worst case


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    batch_split: str | None = None
    restore: str = "copy"
    naive: bool = False  # every pass all-reduces
    micro_batches: int = 1  # sgd-ga2: two half-size micro-batches, no noise

    def available(self, world_size: int) -> str | None:
        """None, or why this variant cannot run at this world size."""
        if self.method not in METHODS:
            return f"method {self.method!r} does not exist"
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
]
VARIANT_NAMES = [v.name for v in VARIANTS]


# -- pieces run on every rank ----------------------------------------------------------------------
class GradientAccumulation(SGD):
    """Plain SGD over two micro-batches (the even and the odd half): ``halves`` without the noise."""

    name = "sgd-ga2"

    def passes(self) -> list[Pass]:
        return [Pass("even", 0.5), Pass("odd", 0.5)]


class NaiveDDPBackend(DDPBackend):
    """S-SGD as written by hand: no ``no_sync()``, so both passes all-reduce."""

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

    def __init__(self, variant: Variant, base_model: nn.Module, opts: argparse.Namespace, rank: int, world_size: int):
        self.variant = variant
        device = next(base_model.parameters()).device
        self.device = device
        self.model = copy.deepcopy(base_model)
        optimizer = build_optimizer(OptimConfig(lr=0.01), self.model.parameters())
        backend_cls = NaiveDDPBackend if variant.naive else DDPBackend
        self.backend = backend_cls(self.model, optimizer, precision=opts.precision)  # training's default: no host sync
        self.comm = CommCounter(world_size)
        self.backend.ddp.register_comm_hook(self.comm, counting_allreduce)
        cfg = Config(method=variant.method, seed=opts.seed)
        cfg.noise.restore = variant.restore
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
        self.comm.communicate = communicate
        self.model.train()
        if cuda:
            torch.cuda.synchronize(self.device)
        comm = []  # (bytes, calls) of each step: the hook runs on the host as the backward is queued
        t0 = time.perf_counter()
        for _ in range(count):
            self.backend.train_step(self.method, x, y, self.step)
            comm.append(self.comm.take())
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
        }


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active, on any device.

    On the CPU it stands in for CUDA's ``max_memory_allocated``: RSS cannot tell a parameter-sized
    difference (the allocator keeps freed memory, and activations are hundreds of times larger than
    ResNet-20's weights). On the GPU it is used too, because frees of memory allocated before the
    measurement (earlier variants') would otherwise offset the difference between variants; cuDNN's
    workspace and NCCL's buffers are not tensors, so they are not counted.

    A storage counts from the op that allocates it (an output aliasing none of the op's inputs) until
    it dies; storages alive before entering count as 0.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in inputs and key not in self._live:
                    self._live[key] = (StorageWeakRef(storage), nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _batch(opts: argparse.Namespace, shape: tuple[int, ...], rank: int, world_size: int, device: torch.device):
    """This rank's fixed random batch: the cost of a step does not depend on the data."""
    local = opts.batch_size // world_size
    gen = generator(Stream.BENCH_DATA, rank)
    x = torch.randn(local, *shape, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (local,), generator=gen)
    return x.to(device), y.to(device)


def _gather(values: list[float]) -> list[list[float]]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def _run_rank(rank: int, world_size: int, opts: argparse.Namespace) -> dict[str, Any] | None:
    """Everything one rank does; rank 0 returns the aggregated measurements."""
    device = torch.device("cuda", rank) if opts.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(opts.threads)
    seed_initial_weights(opts.seed)
    input_shape = INPUT_SHAPES.get(opts.model, (3, 32, 32))
    base = build_model(ModelConfig(name=opts.model), input_shape, NUM_CLASSES).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    x, y = _batch(opts, input_shape, rank, world_size, device)
    variants = [v for v in VARIANTS if v.name in opts.variants and v.available(world_size) is None]
    runners = [Runner(v, base, opts, rank, world_size) for v in variants]
    compute_names = {"sgd", "ssgd-halves"} if opts.project else set()

    def interleaved(repetitions: int, record: bool) -> tuple[dict[str, list[dict]], dict[str, list[float]]]:
        """Steps of every variant in turn; ``compute``: the same step with the all-reduce skipped."""
        samples: dict[str, list[dict]] = {r.variant.name: [] for r in runners}
        compute: dict[str, list[float]] = {n: [] for n in compute_names}
        for rep in range(repetitions):
            shift = rep % len(runners)  # rotate the order: no variant always follows the same one
            for runner in runners[shift:] + runners[:shift]:
                dist.barrier()
                sample = runner.run_steps(x, y, opts.burst)
                if record:
                    samples[runner.variant.name].append(sample)
                if runner.variant.name in compute_names:
                    dist.barrier()
                    t = runner.run_steps(x, y, opts.burst, communicate=False)["step"]
                    if record:
                        compute[runner.variant.name].append(t)
        return samples, compute

    interleaved(opts.warmup, record=False)
    samples, compute_times = interleaved(opts.steps, record=True)

    # Memory: each variant again, alone: the peak of everything it allocates, from building its copy
    # of the model through three steps (so momentum, the noise backup and DDP's rebuilt buckets count).
    memory: dict[str, tuple[int, int, int]] = {}  # variant: (peak, still held after the steps, device peak)
    if not opts.no_memory:
        del runners
        gc.collect()
        for v in variants:
            device_peak = -1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                start = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with AllocationTracker() as tracker:
                runner = Runner(v, base, opts, rank, world_size)
                runner.run_steps(x, y, 3)
            if device.type == "cuda":
                device_peak = torch.cuda.max_memory_allocated(device) - start
            memory[v.name] = (tracker.peak, tracker.current, device_peak)
            del runner
            gc.collect()

    # Every rank's numbers to rank 0: a step takes as long as its slowest rank.
    per_rank: dict[str, Any] = {}
    for v in variants:
        s = samples[v.name]
        per_rank[v.name] = {
            "step": _gather([d["step"] for d in s]),
            "noise": _gather([d["noise"] for d in s]),
            "bytes": s[-1]["bytes"] if s else 0,
            "calls": s[-1]["calls"] if s else 0,
            "bytes_all_steps": sorted({b for d in s for b in d["bytes_each"]}),
            "memory": _gather(list(memory.get(v.name, (-1, -1, -1)))),
            "compute": _gather(compute_times.get(v.name, [])),
        }
    if rank != 0:
        return None
    results = []
    for v in variants:
        r = per_rank[v.name]
        steps = [max(ts) for ts in zip(*r["step"])]
        noise = [statistics.fmean(ns) for ns in zip(*r["noise"])]
        compute = [max(ts) for ts in zip(*r["compute"])] if r["compute"][0] else []
        mem, held, device_peak = (max(m[i] for m in r["memory"]) for i in range(3))
        results.append(
            {
                "variant": v.name,
                "method": v.method,
                "batch_split": v.batch_split,
                "noise_restore": v.restore if v.method in ("ssgd", "gni", "smoothout") else None,
                "syncs_every_pass": v.naive,
                "step_time_s": statistics.median(steps),
                "step_time_iqr_s": _iqr(steps),
                "samples_per_s": opts.batch_size / statistics.median(steps),
                "noise_time_s": statistics.median(noise),
                "noise_fraction": statistics.median(noise) / statistics.median(steps),
                "comm_bytes_per_step": r["bytes"],
                "comm_calls_per_step": r["calls"],
                "comm_bytes_constant": len(r["bytes_all_steps"]) == 1,
                "peak_memory_bytes": mem if mem >= 0 else None,
                "held_memory_bytes": held if held >= 0 else None,
                "max_memory_allocated_bytes": device_peak if device_peak >= 0 else None,  # CUDA only
                "compute_time_s": statistics.median(compute) if compute else None,
            }
        )
    return {"param_bytes": param_bytes, "results": results, "peak_rss_bytes_rank0": _peak_rss_bytes()}


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _worker(rank: int, world_size: int, port: int, opts: argparse.Namespace, out_path: str) -> None:
    backend = "nccl" if opts.device == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", rank)} if opts.device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, **kwargs)
    try:
        out = _run_rank(rank, world_size, opts)
        if out is not None:
            Path(out_path).write_text(json.dumps(out))
        # The variants' DDP wrappers hold work on the group: free them, and leave together, before the
        # group goes (a rank tearing gloo down under a live one can abort the other).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the projection (a model, not a measurement) --------------------------------------------------
def ring_allreduce_seconds(nbytes: float, gpus: int, bandwidth_bytes_per_s: float, latency_s: float, calls: int = 1) -> float:
    """Ring all-reduce of ``nbytes`` over ``gpus`` in ``calls`` pieces: calls x latency + 2(p-1)/p x bytes / bandwidth."""
    if gpus <= 1:
        return 0.0
    return calls * latency_s + 2 * (gpus - 1) / gpus * nbytes / bandwidth_bytes_per_s


def project_step(
    compute_s: float,
    grad_bytes: float,
    all_reduces: int,
    gpus: int,
    bandwidth_bytes_per_s: float,
    latency_s: float,
    overlap: float,
    calls: int = 1,
) -> dict[str, float]:
    """Weak scaling (fixed per-GPU batch): step = compute + (1 - overlap) x all-reduce time, per all-reduce."""
    comm = all_reduces * ring_allreduce_seconds(grad_bytes, gpus, bandwidth_bytes_per_s, latency_s, calls)
    step = compute_s + (1.0 - overlap) * comm
    return {"gpus": gpus, "comm_s": comm, "step_s": step, "efficiency": compute_s / step}


def projection(
    compute: dict[str, float],
    grad_bytes: float,
    calls: int,
    bandwidth_gbs: float,
    latency_us: float,
    overlap: float,
    gpus: tuple[int, ...] = PROJECTION_GPUS,
) -> dict[str, Any]:
    """``compute``: measured compute-only step time of ``sgd`` and ``ssgd`` (S-SGD ``halves``); the naive
    version computes what ``ssgd`` does and all-reduces twice."""
    bw, lat = bandwidth_gbs * 1e9, latency_us * 1e-6
    plan = {"sgd": (compute["sgd"], 1), "ssgd": (compute["ssgd"], 1), "ssgd-naive": (compute["ssgd"], 2)}
    rows = []
    for p in gpus:
        row: dict[str, Any] = {"gpus": p}
        for name, (c, n) in plan.items():
            r = project_step(c, grad_bytes, n, p, bw, lat, overlap, calls)
            row[name] = {"step_s": r["step_s"], "comm_s": r["comm_s"], "efficiency": r["efficiency"]}
        row["ssgd_over_sgd"] = row["ssgd"]["step_s"] / row["sgd"]["step_s"]
        row["naive_over_ssgd"] = row["ssgd-naive"]["step_s"] / row["ssgd"]["step_s"]
        rows.append(row)
    return {
        "note": "MODEL, not a measurement: ring all-reduce, calls x latency + 2(p-1)/p x bytes / bandwidth, "
        "(1 - overlap) of it exposed, fixed per-GPU batch (weak scaling); compute times measured here",
        "bandwidth_gbs": bandwidth_gbs,
        "latency_us": latency_us,
        "overlap": overlap,
        "grad_bytes": grad_bytes,
        "calls_per_allreduce": calls,
        "compute_s": {"sgd": compute["sgd"], "ssgd": compute["ssgd"]},
        "rows": rows,
    }


# -- the driver -----------------------------------------------------------------------------------
def _machine(opts: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads_per_rank": opts.threads,
        "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if opts.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def check_options(opts: argparse.Namespace) -> None:
    """User errors as ``ConfigError``: one line naming the flag and the fix."""
    if opts.world_size < 1:
        raise ConfigError(f"--world-size {opts.world_size}: must be at least 1")
    if opts.batch_size % (2 * opts.world_size):
        raise ConfigError(
            f"--batch-size {opts.batch_size}: S-SGD 'halves' splits every rank's batch in two, so it must be a "
            f"multiple of 2 x {opts.world_size} ranks = {2 * opts.world_size}"
        )
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
        if opts.world_size > torch.cuda.device_count():
            raise ConfigError(
                f"--world-size {opts.world_size}: only {torch.cuda.device_count()} GPU(s) visible; one rank per GPU"
            )
    models = ModelConfig.model_fields["name"].annotation.__args__
    if opts.model not in models:
        raise ConfigError(f"--model {opts.model}: expected one of {', '.join(models)}")
    opts.variants = list(VARIANT_NAMES) if not opts.variants else list(opts.variants)
    unknown = [v for v in opts.variants if v not in VARIANT_NAMES]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANT_NAMES)}")
    if "sgd" not in opts.variants:
        opts.variants = ["sgd", *opts.variants]  # the reference every ratio is taken to
    if opts.project:
        opts.variants += [v for v in ("ssgd-halves", "ssgd-naive") if v not in opts.variants]
    opts.bandwidth = DEFAULT_BANDWIDTH_GBS if opts.bandwidth is None else opts.bandwidth
    opts.latency_us = DEFAULT_LATENCY_US if opts.latency_us is None else opts.latency_us
    opts.overlap = DEFAULT_OVERLAP if opts.overlap is None else opts.overlap
    if opts.bandwidth <= 0 or opts.latency_us < 0:
        raise ConfigError(f"--bandwidth {opts.bandwidth} / --latency-us {opts.latency_us}: bandwidth > 0, latency >= 0")
    if opts.steps < 1 or opts.warmup < 0:
        raise ConfigError(f"--steps {opts.steps} / --warmup {opts.warmup}: at least one timed step, warm-up >= 0")
    if opts.burst is None:
        opts.burst = 8 if opts.device == "cuda" else 1  # only an asynchronous device has launches to hide
    if opts.burst < 1:
        raise ConfigError(f"--burst {opts.burst}: at least one step per timed sample")
    if not 0.0 <= opts.overlap <= 1.0:
        raise ConfigError(f"--overlap {opts.overlap}: a fraction between 0 and 1")
    if opts.threads is None:
        opts.threads = max(1, (os.cpu_count() or 1) // opts.world_size) if opts.device == "cpu" else 4


def run_bench(opts: argparse.Namespace) -> dict[str, Any]:
    """Spawn the ranks, measure, and return the report (also written to ``--json``)."""
    check_options(opts)
    machine = _machine(opts)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "rank0.json")
        port = _free_port()
        if opts.world_size == 1:
            threads = torch.get_num_threads()
            try:
                _worker(0, 1, port, opts, out_path)
            finally:
                torch.set_num_threads(threads)
        else:
            torch.multiprocessing.start_processes(
                _worker, args=(opts.world_size, port, opts, out_path), nprocs=opts.world_size, start_method="spawn"
            )
        measured = json.loads(Path(out_path).read_text())
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["peak_rss_bytes_rank0"] = measured["peak_rss_bytes_rank0"]
    results = measured["results"]
    add_ratios(results, measured["param_bytes"])
    skipped = {v.name: v.available(opts.world_size) for v in VARIANTS if v.name in opts.variants}
    report: dict[str, Any] = {
        "machine": machine,
        "torch": torch.__version__,
        "model": opts.model,
        "param_bytes": measured["param_bytes"],
        "world_size": opts.world_size,
        "batch_size": opts.batch_size,
        "local_batch_size": opts.batch_size // opts.world_size,
        "device": opts.device,
        "precision": opts.precision,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "burst": opts.burst,
        "results": results,
        "skipped": {k: why for k, why in skipped.items() if why},
    }
    if opts.project:
        by = {r["variant"]: r for r in results}
        compute = {"sgd": by["sgd"]["compute_time_s"], "ssgd": by["ssgd-halves"]["compute_time_s"]}
        report["projection"] = projection(
            compute,
            by["sgd"]["comm_bytes_per_step"],
            by["sgd"]["comm_calls_per_step"],
            opts.bandwidth,
            opts.latency_us,
            opts.overlap,
        )
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_ratios(results: list[dict[str, Any]], param_bytes: int) -> None:
    """Ratios to ``sgd`` (and to ``sgd-ga2`` where it ran); memory in parameter-size units."""
    by = {r["variant"]: r for r in results}
    sgd, ga2 = by["sgd"], by.get("sgd-ga2")
    for r in results:
        r["ratio_step_time"] = r["step_time_s"] / sgd["step_time_s"]
        r["ratio_step_time_ga2"] = r["step_time_s"] / ga2["step_time_s"] if ga2 else None
        r["ratio_comm_bytes"] = r["comm_bytes_per_step"] / sgd["comm_bytes_per_step"] if sgd["comm_bytes_per_step"] else None
        mem, base = r["peak_memory_bytes"], sgd["peak_memory_bytes"]
        r["extra_memory_params"] = (mem - base) / param_bytes if mem is not None and base is not None else None
        base_ga2 = ga2["peak_memory_bytes"] if ga2 else None
        r["extra_memory_params_ga2"] = (mem - base_ga2) / param_bytes if mem is not None and base_ga2 is not None else None
        held, base_held = r["held_memory_bytes"], sgd["held_memory_bytes"]
        r["extra_held_memory_params"] = (held - base_held) / param_bytes if held is not None and base_held is not None else None


def format_table(report: dict[str, Any]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (
        f"{report['model']}, {report['world_size']} x {report['device']} ({report['precision']}), global batch "
        f"{report['batch_size']}, median of {report['steps']} interleaved samples of {report['burst']} step(s), torch {report['torch']}"
    )
    cols = ["variant", "step ms", "samples/s", "x sgd", "x ga2", "comm MB", "x comm", "peak+", "peak+ga2", "held+", "noise %"]
    rows = [cols]
    for r in report["results"]:
        rows.append(
            [
                r["variant"],
                num(r["step_time_s"] * 1e3, ".1f"),
                num(r["samples_per_s"], ".0f"),
                num(r["ratio_step_time"], ".3f"),
                num(r["ratio_step_time_ga2"], ".3f"),
                num(r["comm_bytes_per_step"] / 1e6, ".3f"),
                num(r["ratio_comm_bytes"], ".2f"),
                num(r["extra_memory_params"], "+.2f"),
                num(r["extra_memory_params_ga2"], "+.2f"),
                num(r["extra_held_memory_params"], "+.2f"),
                num(100 * r["noise_fraction"], ".2f"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "peak+: peak memory of the step over sgd's (peak+ga2: over sgd-ga2's); held+: memory still held between "
        "steps over sgd's; all in parameter-size units. noise %: drawing noise, perturbing and restoring, "
        "as a share of the step"
    )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    if "projection" in report:
        lines += ["", format_projection(report["projection"])]
    return "\n".join(lines)


def format_projection(proj: dict[str, Any]) -> str:
    lines = [
        f"PROJECTION ({proj['note']})",
        f"bandwidth {proj['bandwidth_gbs']} GB/s, latency {proj['latency_us']} us per call x "
        f"{proj['calls_per_allreduce']} calls, overlap {proj['overlap']}, gradient {proj['grad_bytes'] / 1e6:.3f} MB; "
        f"compute: sgd {proj['compute_s']['sgd'] * 1e3:.1f} ms, ssgd {proj['compute_s']['ssgd'] * 1e3:.1f} ms",
        f"{'GPUs':>5}  {'sgd ms':>8} {'eff':>5}  {'ssgd ms':>8} {'eff':>5}  {'naive ms':>8} {'eff':>5}  "
        f"{'ssgd/sgd':>8}  {'naive/ssgd':>10}",
    ]
    for row in proj["rows"]:
        lines.append(
            f"{row['gpus']:>5}  {row['sgd']['step_s'] * 1e3:>8.1f} {row['sgd']['efficiency']:>5.2f}  "
            f"{row['ssgd']['step_s'] * 1e3:>8.1f} {row['ssgd']['efficiency']:>5.2f}  "
            f"{row['ssgd-naive']['step_s'] * 1e3:>8.1f} {row['ssgd-naive']['efficiency']:>5.2f}  "
            f"{row['ssgd_over_sgd']:>8.3f}  {row['naive_over_ssgd']:>10.3f}"
        )
    return "\n".join(lines)


def main(opts: argparse.Namespace) -> int:
    report = run_bench(opts)
    print(format_table(report))
    if opts.json:
        print(f"\njson: {opts.json}")
    return 0

