"""The measurement: options resolved for this machine, ranks spawned, variants interleaved, report built.

Every rank runs every variant in turn on one process group, so a slow moment of a shared machine hits
all variants alike; rank 0 aggregates (a step takes as long as its slowest rank) and writes the report.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import socket
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import BenchOptions, ModelConfig
from ..errors import ConfigError
from ..models import build_model
from ..seeding import Stream, generator, seed_initial_weights
from .memory import AllocationTracker, peak_rss_bytes
from .projection import projection
from .variants import VARIANT_NAMES, VARIANTS, Runner

INPUT_SHAPES = {"mlp": (40,), "cnn1d": (40,)}  # MNIST-1D; the image models take CIFAR's (3, 32, 32)
NUM_CLASSES = 10


def resolve(opts: BenchOptions) -> BenchOptions:
    """A copy with what depends on this machine filled in (device, burst, threads) and the variant list
    completed; checks that need torch or the variants raise ``ConfigError``. The caller's options stay as given."""
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
        if opts.world_size > torch.cuda.device_count():
            raise ConfigError(
                f"--world-size {opts.world_size}: only {torch.cuda.device_count()} GPU(s) visible; one rank per GPU"
            )
    variants = list(opts.variants) if opts.variants else list(VARIANT_NAMES)
    unknown = [v for v in variants if v not in VARIANT_NAMES]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANT_NAMES)}")
    if "sgd" not in variants:
        variants = ["sgd", *variants]  # the reference every ratio is taken to
    if opts.project:
        variants += [v for v in ("ssgd-halves", "ssgd-naive") if v not in variants]
    if opts.backend == "fsdp" and (opts.project or opts.precision == "fp16"):
        raise ConfigError("--backend fsdp: --project and --precision fp16 are not supported; leave them out")
    burst = opts.burst
    if burst is None:
        burst = 8 if device == "cuda" else 1  # only an asynchronous device has launches to hide
    threads = opts.threads
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // opts.world_size) if device == "cpu" else 4
    return opts.model_copy(update={"device": device, "variants": variants, "burst": burst, "threads": threads})


# -- on every rank ---------------------------------------------------------------------------------
def _batch(opts: BenchOptions, shape: tuple[int, ...], rank: int, world_size: int, device: torch.device):
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


def _run_rank(rank: int, world_size: int, opts: BenchOptions) -> dict[str, Any] | None:
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
    variants = [v for v in VARIANTS if v.name in opts.variants and v.available(world_size, opts.backend) is None]
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
    if opts.memory:
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
            "gathered_bytes": s[-1]["gathered_bytes"] if s else 0,
            "bytes_all_steps": sorted({b for d in s for b in d["bytes_each"]}),
            "memory": _gather(list(memory.get(v.name, (-1, -1, -1)))),
            "compute": _gather(compute_times.get(v.name, [])),
        }
    if rank != 0:
        return None
    results = []
    for v in variants:
        r = per_rank[v.name]
        steps = [max(ts) for ts in zip(*r["step"], strict=True)]
        noise = [statistics.fmean(ns) for ns in zip(*r["noise"], strict=True)]
        compute = [max(ts) for ts in zip(*r["compute"], strict=True)] if r["compute"][0] else []
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
                "gathered_bytes_per_step": r["gathered_bytes"],  # FSDP: the weights all-gathered (0 under DDP)
                "peak_memory_bytes": mem if mem >= 0 else None,
                "held_memory_bytes": held if held >= 0 else None,
                "max_memory_allocated_bytes": device_peak if device_peak >= 0 else None,  # CUDA only
                "compute_time_s": statistics.median(compute) if compute else None,
            }
        )
    return {"param_bytes": param_bytes, "results": results, "peak_rss_bytes_rank0": peak_rss_bytes()}


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _worker(rank: int, world_size: int, port: int, opts: BenchOptions, out_path: str) -> None:
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


# -- the driver ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine(opts: BenchOptions) -> dict[str, Any]:
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


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Spawn the ranks, measure, and return the report (also written to ``opts.json_path``)."""
    opts = resolve(opts)
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
    skipped = {v.name: v.available(opts.world_size, opts.backend) for v in VARIANTS if v.name in opts.variants}
    report: dict[str, Any] = {
        "machine": machine,
        "torch": torch.__version__,
        "model": opts.model,
        "param_bytes": measured["param_bytes"],
        "world_size": opts.world_size,
        "batch_size": opts.batch_size,
        "local_batch_size": opts.batch_size // opts.world_size,
        "accumulation_steps": opts.accumulation_steps,
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
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_ratios(results: list[dict[str, Any]], param_bytes: int) -> None:
    """Ratios to ``sgd`` (and to ``sgd-ga2`` where it ran); memory in parameter-size units."""
    by = {r["variant"]: r for r in results}
    sgd, ga2 = by["sgd"], by.get("sgd-ga2")
    for r in results:
        r["ratio_step_time"] = r["step_time_s"] / sgd["step_time_s"]
        r["ratio_step_time_ga2"] = r["step_time_s"] / ga2["step_time_s"] if ga2 else None
        sgd_bytes = sgd["comm_bytes_per_step"]
        r["ratio_comm_bytes"] = r["comm_bytes_per_step"] / sgd_bytes if sgd_bytes else None
        sgd_gathered = sgd["gathered_bytes_per_step"]
        r["ratio_gathered_bytes"] = r["gathered_bytes_per_step"] / sgd_gathered if sgd_gathered else None
        mem, base = r["peak_memory_bytes"], sgd["peak_memory_bytes"]
        r["extra_memory_params"] = (mem - base) / param_bytes if mem is not None and base is not None else None
        base_ga2 = ga2["peak_memory_bytes"] if ga2 else None
        r["extra_memory_params_ga2"] = (
            (mem - base_ga2) / param_bytes if mem is not None and base_ga2 is not None else None
        )
        held, base_held = r["held_memory_bytes"], sgd["held_memory_bytes"]
        r["extra_held_memory_params"] = (
            (held - base_held) / param_bytes if held is not None and base_held is not None else None
        )
