"""Flatness of a run directory: load its checkpoint, measure, write ``flatness/flatness.json`` and figures.

Separate from the measures so that these stay usable on any model and samples, and so that the file
layout (which ``report`` and ``sweep`` read) is defined once.

Usage: ``ssgd-dist flatness RUN_DIR`` (add ``--workers N``, or launch under torchrun, to shard).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed, safe_yaml
from ..backends.dcp import read_whole_model
from ..checkpoint import load_checkpoint_file, load_latest
from ..config import FlatnessOptions, load_config
from ..data import load_dataset
from ..errors import ConfigError
from ..models import build_loss, build_model
from ..seeding import seed_initial_weights
from ..usercode import is_import_path
from .flatness import measure
from .plots import plot_landscape_1d, plot_landscape_2d, plot_perturbation

FLATNESS_DIR = "flatness"
FLATNESS_FILE = "flatness.json"


def flatness_path(run_dir: Path) -> Path:
    return Path(run_dir) / FLATNESS_DIR / FLATNESS_FILE


def measure_run(
    run_dir: Path,
    opts: FlatnessOptions | None = None,
    checkpoint: Path | None = None,
    out: Path | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Measure a run's final (or a given) checkpoint; rank 0 writes ``flatness.json`` and PNGs to ``out``.

    Joins the process group when launched by torchrun or Ray (each rank then takes a shard of the
    samples); otherwise runs alone.
    """
    run_dir = Path(run_dir)
    opts = opts or FlatnessOptions()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"flatness: {run_dir} is not a run directory (no config.yaml)")
    user_code = _user_code(safe_yaml.read_mapping(run_dir / "config.yaml", f"flatness: {run_dir / 'config.yaml'}"))
    if user_code and int(os.environ.get("RANK", "0")) == 0:
        print(f"ssgd-dist: flatness: importing {user_code} (named in {run_dir / 'config.yaml'})", flush=True)
    cfg = load_config(str(run_dir / "config.yaml"))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = distributed.setup(cfg.device)
    try:
        data = load_dataset(cfg.data)
        seed_initial_weights(cfg.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(ctx.device)
        like = model.state_dict()

        def read_sharded(path: Path) -> dict[str, Any]:  # a sharded (FSDP) checkpoint, whole in this process
            return read_whole_model(path, like)

        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if not checkpoint.exists():
                raise ConfigError(f"flatness --checkpoint {checkpoint}: no such file or directory")
            if checkpoint.is_dir():
                try:
                    state = read_sharded(checkpoint)
                except Exception as exc:  # noqa: BLE001 - any unreadable directory: one line, exit 2
                    raise ConfigError(
                        f"flatness --checkpoint {checkpoint}: cannot be read as a sharded checkpoint of the model of "
                        f"{run_dir / 'config.yaml'} ({type(exc).__name__}: {str(exc)[:300]})".replace("\n", " ")
                    ) from exc
            else:
                state = load_checkpoint_file(checkpoint, map_location=ctx.device)
            ckpt_path = checkpoint
        else:
            found = load_latest(run_dir, map_location=ctx.device, read_sharded=read_sharded)
            if found is None:
                raise ConfigError(
                    f"flatness: {run_dir} has no checkpoint yet (train it first, or pass --checkpoint FILE)"
                )
            state, ckpt_path = found
        problem = _state_mismatch(model.state_dict(), state.get("model"))
        if problem:
            raise ConfigError(
                f"flatness: checkpoint {ckpt_path} does not fit the model of {run_dir / 'config.yaml'} "
                f"(model.name = {cfg.model.name}): {problem}; pass a checkpoint of this run, or the run directory "
                "it came from"
            )
        model.load_state_dict(state["model"])
        n = len(data.y_train) if opts.samples <= 0 else min(opts.samples, len(data.y_train))
        shard = slice(ctx.rank, None, ctx.world_size)
        heading = f"ssgd-dist: flatness of {ckpt_path} on {n} training examples"
        progress = _progress_printer(heading) if ctx.is_main else _quiet
        loss = build_loss(cfg.train.loss)
        result = measure(model, data.x_train[:n][shard], data.y_train[:n][shard], opts, loss, progress)
        result.update(
            run_dir=str(run_dir), checkpoint=str(ckpt_path), step=int(state.get("step", -1)), world_size=ctx.world_size
        )
        if ctx.is_main:
            write_outputs(result, Path(out) if out else run_dir / FLATNESS_DIR, run_dir.name, figures)
        distributed.barrier()
        return result
    finally:
        distributed.teardown(ctx)


def write_outputs(result: dict[str, Any], out: Path, title: str = "", figures: bool = True) -> Path:
    """``flatness.json`` (replaced atomically: a sweep treats its presence as "measured") and, unless a report
    draws them for several runs anyway (the quickstart), the run's own figures: seconds on a small CPU."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FLATNESS_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / FLATNESS_FILE)
    label = title or "run"
    if not figures:
        return out / FLATNESS_FILE
    if result.get("perturbation"):
        plot_perturbation(
            {label: result["perturbation"]}, out / "perturbation.png", f"Random-perturbation sharpness: {title}"
        )
    if "landscape_1d" in result:
        plot_landscape_1d({label: result["landscape_1d"]}, out / "landscape_1d.png", f"1-D loss landscape: {title}")
    if "landscape_2d" in result:
        plot_landscape_2d({label: result["landscape_2d"]}, out / "landscape_2d.png", f"2-D loss landscape: {title}")
    return out / FLATNESS_FILE


def _progress_printer(heading: str) -> Callable[[str], None]:
    """Prints the heading now, then each measure as it starts with the seconds since: a full measurement
    takes tens of seconds, and a silent terminal for that long looks hung."""
    start = time.perf_counter()
    print(heading, flush=True)
    return lambda stage: print(f"  {time.perf_counter() - start:5.1f} s  {stage}", flush=True)


def _quiet(stage: str) -> None:
    """Progress on ranks other than 0: rank 0 speaks for all."""


def summary_line(result: dict[str, Any]) -> str:
    h = result.get("hessian", {})
    parts = [f"loss={result['loss']:.4g}"]
    if result.get("acc") is not None:
        parts.append(f"acc={result['acc']:.4f}")
    if "top_eigenvalue" in h:
        parts.append(f"lambda_max={h['top_eigenvalue']:.4g}")
    if "trace" in h:
        parts.append(f"trace={h['trace']:.4g}+-{h['trace_stderr']:.2g}")
    for row in result.get("perturbation", []):
        parts.append(f"dL(r={row['radius']:g})={row['loss_increase']:.3g}")
    return " ".join(parts)


if __name__ == "__main__":  # pragma: no cover - convenience
    print(summary_line(measure_run(Path(sys.argv[1]))))


def _user_code(saved: dict[str, Any]) -> str:
    """The modules a saved config names by import path, as ``key module:attribute`` (empty: none); read from
    the raw YAML, so that the user sees them before anything is imported."""
    named = [
        f"{section}.{field} {value}"
        for section, field in (("model", "name"), ("data", "name"), ("train", "loss"))
        if isinstance(value := (saved.get(section) or {}).get(field), str) and is_import_path(value)
    ]
    return ", ".join(named)


def _state_mismatch(expected: dict[str, torch.Tensor], given: object) -> str | None:
    """Why the checkpoint's ``model`` tensors cannot load into a model with ``expected`` (None: they can)."""
    if not isinstance(given, dict):
        return "it holds no model weights"
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} tensors missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        return ", ".join(parts)
    for key, tensor in expected.items():
        other = given[key]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            return f"{key} has shape {shape}, the model expects {tuple(tensor.shape)}"
    return None
