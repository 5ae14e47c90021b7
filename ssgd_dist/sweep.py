"""Grids of runs (methods x batch sizes x seeds x any config key), locally or as Ray Tune trials.

A grid file is YAML::

    name: mnist1d-large-batch        # default output directory: runs/<name>
    base: quickstart                 # packaged config name, a YAML path (relative to this file), or a mapping
    set: {train.progress: false}     # dotted overrides for every run
    methods:                         # a method name, or {method, label, set} for a variant
      - sgd
      - {method: gni, set: {noise.alpha: 0.2}}
      - {method: ssgd, label: ssgd-full, set: {ssgd.batch_split: full}}
    batch_sizes: [32, 2000]
    batch_set: {32: {train.eval_every: 20}}   # per-batch-size overrides
    seeds: [0, 1, 2]
    vary: {noise.alpha: [0.1, 0.3]}  # any other config keys: their cartesian product
    flatness: {samples: 2000}        # measure each finished run (see flatness.FlatnessOptions); false: skip
                                     # plus seeds: [...] (measure only these seeds) and
                                     # landscape_2d_seeds: [...] (the costly 2-D landscape only for these)
    blocks:                          # optional: several sub-grids sharing the keys above, e.g.
      - {batch_sizes: [2000], seeds: [0, 1, 2, 3, 4]}
      - {batch_sizes: [32], methods: [sgd], seeds: [0, 1]}

Each cell becomes one run directory ``OUT/<label>-b<batch>[-<key><value>]-s<seed>`` holding the usual
``config.yaml``, ``metrics.jsonl`` and checkpoints, plus ``sweep.json`` (its label and grid
coordinates, which ``report`` uses). The sweep is resumable: a run whose last evaluation is at the
planned final step is skipped, a run that stopped on a non-finite loss is recorded as diverged and
not repeated, and a half-finished run resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import safe_yaml
from .analysis.flatness_run import flatness_path
from .config import (
    Config,
    FlatnessOptions,
    apply_override,
    dump_config,
    packaged_names,
    parse_yaml_mapping,
    read_config_yaml,
    read_named_yaml,
    validate,
)
from .errors import EXIT_NONFINITE, ConfigError, NonFiniteError
from .safe_yaml import clip, shown

GRID_KEYS = {
    "name",
    "base",
    "set",
    "methods",
    "batch_sizes",
    "batch_set",
    "seeds",
    "vary",
    "flatness",
    "blocks",
    "description",
}
BLOCK_KEYS = {"set", "methods", "batch_sizes", "batch_set", "seeds", "vary"}
SWEEP_FILE = "sweep.json"


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class Cell:
    name: str  # run directory name inside the sweep's output directory
    label: str  # the row of the comparison table (method variant and varied keys)
    method: str
    batch_size: int
    seed: int
    vary: dict[str, Any]
    cfg: Config

    def info(self, grid: str) -> dict[str, Any]:
        return {
            "grid": grid,
            "name": self.name,
            "label": self.label,
            "method": self.method,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "vary": self.vary,
        }


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    flatness: FlatnessOptions | None
    source: str = ""
    flatness_seeds: list[int] | None = None  # None: every seed
    landscape_2d_seeds: list[int] | None = None  # None: every measured seed

    def flatness_for(self, cell: Cell) -> FlatnessOptions | None:
        """The measurement options of one cell, or None when the cell is not measured."""
        if self.flatness is None or (self.flatness_seeds is not None and cell.seed not in self.flatness_seeds):
            return None
        if self.landscape_2d_seeds is not None and cell.seed not in self.landscape_2d_seeds:
            return self.flatness.model_copy(update={"landscape_2d": 0})
        return self.flatness

    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- reading grids -----------------------------------------------------------------------------------
def packaged_grid_names() -> list[str]:
    return packaged_names("grids")


def _read_grid_file(name_or_path: str) -> tuple[dict[str, Any], Path | None]:
    """The grid's mapping, read like a config file; and its path (None when packaged)."""
    what = f"sweep {clip(name_or_path)}"
    text, where = read_named_yaml(name_or_path, what, "grid", "grids")
    data = parse_yaml_mapping(text, what, "grid keys (name, base, methods, batch_sizes, seeds, ...)")
    unknown = [key for key in data if key not in GRID_KEYS]
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {shown(unknown)}; known: {sorted(GRID_KEYS)}")
    return data, where


def _mapping(value: Any, where: str) -> dict:
    """A grid's mapping-valued entry (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {shown(value)}")
    return value


def _integers(value: Any, where: str) -> list[int] | None:
    """A grid's list of integers (seeds, batch sizes); absent: None."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where} must be a list of integers, e.g. [0, 1, 2], got {shown(value)}")
    return value


def _base_config(base: Any, grid_path: Path | None, source: str) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if isinstance(base, str):
        candidate = grid_path.parent / base if grid_path is not None else None
        if candidate is not None and candidate.is_file():
            return read_config_yaml(str(candidate))
        return read_config_yaml(base)
    raise ConfigError(
        f"sweep {source}: base must be a packaged config name, a YAML path or a mapping, got {shown(base)}"
    )


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    try:
        apply_override(data, f"{key}={json.dumps(value)}")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _apply_mapping(data: dict[str, Any], mapping: Any, where: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted keys to values, got {shown(mapping)}")
    for key, value in mapping.items():
        _set(data, str(key), value, where)


def _method_entries(methods: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{where}: methods must be a non-empty list of names or {{method, label, set}} mappings")
    entries = []
    for m in methods:
        if isinstance(m, str):
            entries.append({"method": m, "label": None, "set": {}})
        elif (
            isinstance(m, dict)
            and "method" in m
            and set(m) <= {"method", "label", "set"}
            and isinstance(m.get("label"), (str, type(None)))
        ):
            entries.append({"method": m["method"], "label": m.get("label"), "set": m.get("set") or {}})
        else:
            raise ConfigError(
                f"{where}: bad methods entry {shown(m)}; use a name or a mapping with keys method, label (text), set"
            )
    return entries


def default_label(cfg: dict[str, Any]) -> str:
    if cfg["method"] == "ssgd":
        return f"ssgd-{cfg['ssgd']['batch_split']}"
    return cfg["method"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")


def _value_text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def load_grid(
    name_or_path: str,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    seeds: list[int] | None = None,
) -> Grid:
    """Expand a grid file into validated cells; ``overrides`` (``KEY=VALUE``) apply to every run.

    ``methods`` and ``batch_sizes`` keep only matching cells (methods match a label or a method name,
    shell patterns allowed); ``seeds`` replaces every block's seeds.
    """
    data, path = _read_grid_file(name_or_path)
    source = clip(str(path or name_or_path))
    if not isinstance(data.get("name"), (str, type(None))):
        raise ConfigError(f"sweep {source}: name must be text (the output directory's name), got {shown(data['name'])}")
    name = str(data.get("name") or Path(name_or_path).stem)
    base = _base_config(data.get("base"), path, source)
    blocks = data.get("blocks") or [{}]
    if not isinstance(blocks, list):
        raise ConfigError(f"sweep {source}: blocks must be a list of mappings")
    cells: dict[str, Cell] = {}
    for bi, block in enumerate(blocks):
        where = f"sweep {source} block {bi}" if data.get("blocks") else f"sweep {source}"
        if not isinstance(block, dict) or set(block) - BLOCK_KEYS:
            raise ConfigError(f"{where}: a block is a mapping with keys among {sorted(BLOCK_KEYS)}")
        spec = {k: data.get(k) for k in BLOCK_KEYS}
        spec.update({k: v for k, v in block.items() if k != "set"})
        block_set = {**_mapping(data.get("set"), f"{where}: set"), **_mapping(block.get("set"), f"{where}: set")}
        entries = _method_entries(spec.get("methods") or [base.get("method", "ssgd")], where)
        sizes = _integers(spec.get("batch_sizes"), f"{where}: batch_sizes") or [None]
        block_seeds = _integers(spec.get("seeds"), f"{where}: seeds")
        if seeds is not None:
            block_seeds = seeds
        elif block_seeds is None:
            block_seeds = [base.get("seed", 0)]
        vary = spec.get("vary") or {}
        if not isinstance(vary, dict) or any(not isinstance(v, list) or not v for v in vary.values()):
            raise ConfigError(f"{where}: vary must map dotted keys to non-empty lists of values")
        batch_set = _mapping(spec.get("batch_set"), f"{where}: batch_set")
        for entry, batch, combo, seed in itertools.product(
            entries, sizes, itertools.product(*vary.values()), block_seeds
        ):
            varied = dict(zip(vary.keys(), combo))
            cfg_data = copy.deepcopy(base)
            _apply_mapping(cfg_data, block_set, f"{where}: set")
            if batch is not None:
                _apply_mapping(
                    cfg_data, batch_set.get(batch) or batch_set.get(str(batch)), f"{where}: batch_set[{batch}]"
                )
            _apply_mapping(cfg_data, entry["set"], f"{where}: methods[{entry['method']}].set")
            for assignment in overrides or []:
                apply_override(cfg_data, assignment)
            for key, value in varied.items():
                _set(cfg_data, key, value, f"{where}: vary")
            _set(cfg_data, "method", entry["method"], f"{where}: methods")
            if batch is not None:
                _set(cfg_data, "data.batch_size", batch, f"{where}: batch_sizes")
            _set(cfg_data, "seed", seed, f"{where}: seeds")
            try:
                cfg = validate(cfg_data)
            except ConfigError as exc:
                raise ConfigError(f"{where}: method {entry['method']}, batch {batch}, seed {seed}: {exc}") from None
            label = entry["label"] or default_label(cfg.to_dict())
            suffix = "".join(f"-{k.rsplit('.', 1)[-1]}{_value_text(v)}" for k, v in varied.items())
            if varied:
                label += " " + ",".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in varied.items())
            run_name = _slug(
                f"{entry['label'] or default_label(cfg.to_dict())}-b{cfg.data.batch_size}{suffix}-s{cfg.seed}"
            )
            cell = Cell(run_name, label, cfg.method, cfg.data.batch_size, cfg.seed, varied, cfg)
            if run_name in cells and cells[run_name].cfg != cfg:
                raise ConfigError(
                    f"{where}: two different runs would share the directory name {run_name}; give one a distinct label"
                )
            cells[run_name] = cell
    selected = list(cells.values())
    if methods:
        selected = [
            c for c in selected if any(fnmatch.fnmatch(c.label, m) or fnmatch.fnmatch(c.method, m) for m in methods)
        ]
    if batch_sizes:
        selected = [c for c in selected if c.batch_size in batch_sizes]
    if not selected:
        raise ConfigError(f"sweep {source}: the filters leave no run")
    flat = (
        dict(_mapping(data.get("flatness"), f"sweep {source}: flatness")) if data.get("flatness") is not False else None
    )
    flat_seeds = _integers(flat.pop("seeds", None), f"sweep {source}: flatness seeds") if flat is not None else None
    land_seeds = (
        _integers(flat.pop("landscape_2d_seeds", None), f"sweep {source}: flatness landscape_2d_seeds")
        if flat is not None
        else None
    )
    try:
        opts = None if flat is None else FlatnessOptions.from_dict(flat)
    except ConfigError as exc:
        raise ConfigError(f"sweep {source}: {exc}") from None
    return Grid(
        name,
        selected,
        opts,
        source=source,
        description=str(data.get("description") or ""),
        flatness_seeds=flat_seeds,
        landscape_2d_seeds=land_seeds,
    )


# -- run state ---------------------------------------------------------------------------------------
def train_size(cfg: Config) -> int:
    """Training examples the run will see (for the planned step count) without loading CIFAR."""
    fixed = {"cifar10": 50000, "cifar100": 50000}
    if cfg.data.name in fixed:
        n = fixed[cfg.data.name]
    else:
        from .data import load_dataset

        n = len(load_dataset(cfg.data.model_copy(update={"train_samples": None})).y_train)
    return min(n, cfg.data.train_samples) if cfg.data.train_samples else n


def planned_steps(cfg: Config) -> int:
    steps = cfg.train.epochs * (train_size(cfg) // cfg.data.batch_size)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def run_status(run_dir: Path, cfg: Config, total: int | None = None) -> str:
    """``done``, ``diverged`` (stopped on a non-finite loss), ``conflict`` (holds another config),
    ``partial`` (started) or ``new``."""
    from .metrics import read_metrics
    from .rundir import run_differences

    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        try:  # re-validated, so keys added to the config schema since the run count as their defaults
            what = f"{clip(str(saved_path))}"
            saved = validate(parse_yaml_mapping(safe_yaml.read_text(saved_path, what), what, "keys to values"))
        except ConfigError:
            return "conflict"
        if run_differences(saved.to_dict(), cfg):
            return "conflict"
    total = planned_steps(cfg) if total is None else total
    evals = [r for r in read_metrics(run_dir) if "test_acc" in r]
    if evals and evals[-1]["step"] == total:
        return "done"
    if (run_dir / "nonfinite.json").exists():
        return "diverged"
    return "partial" if (run_dir / "config.yaml").exists() else "new"


def _write_info(run_dir: Path, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SWEEP_FILE).write_text(json.dumps(info, indent=1) + "\n")


# -- local execution ---------------------------------------------------------------------------------
def _train_cell(cell: Cell, run_dir: Path, workers: int, config_dir: Path) -> str:
    if workers <= 1:
        from .train import train

        try:
            train(cell.cfg, run_dir)
        except NonFiniteError as exc:
            print(f"  {cell.name}: diverged ({exc})")
            return "diverged"
        return "done"
    from .launchers.torchrun import run_torchrun

    config_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = config_dir / f"{cell.name}.yaml"
    cfg_path.write_text(dump_config(cell.cfg))
    rc = run_torchrun(workers, ["train", "--config", str(cfg_path), "--run-dir", str(run_dir)])
    if rc == EXIT_NONFINITE:
        return "diverged"
    return "done" if rc == 0 else f"failed (exit code {rc})"


def _measure_cell(run_dir: Path, opts: FlatnessOptions) -> None:
    from .analysis.flatness_run import measure_run

    if flatness_path(run_dir).exists() or not (Path(run_dir) / "checkpoints").is_dir():
        return
    measure_run(run_dir, opts)


def run_local(grid: Grid, out: Path, workers: int = 1, flatness: bool = True, log=None) -> dict[str, str]:
    """Run the cells one after another (in this process, or through torchrun when ``workers > 1``)."""
    log = log or _print
    out = Path(out)
    statuses: dict[str, str] = {}
    todo = len(grid.cells)
    for i, cell in enumerate(grid.cells, 1):
        run_dir = out / cell.name
        status = run_status(run_dir, cell.cfg)
        if status in ("done", "diverged"):
            log(f"[{i}/{todo}] {cell.name}: {status}, skipped")
        elif status == "conflict":
            log(
                f"[{i}/{todo}] {cell.name}: {run_dir} holds a run with a different configuration; "
                "move it away or use another --out"
            )
        else:
            log(f"[{i}/{todo}] {cell.name}: {'resuming' if status == 'partial' else 'training'}")
            _write_info(run_dir, cell.info(grid.name))
            start = time.perf_counter()
            try:
                status = _train_cell(cell, run_dir, workers, out / ".sweep-configs")
            except ConfigError:
                raise  # a user error (missing data, bad value) would fail every cell alike
            except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the grid
                traceback.print_exc()
                status = f"failed ({type(exc).__name__}: {exc})"
            log(f"[{i}/{todo}] {cell.name}: {status} in {time.perf_counter() - start:.1f} s")
        opts = grid.flatness_for(cell)
        if status == "done" and flatness and opts is not None and not flatness_path(run_dir).exists():
            start = time.perf_counter()
            try:
                _measure_cell(run_dir, opts)
                log(f"[{i}/{todo}] {cell.name}: flatness measured in {time.perf_counter() - start:.1f} s")
            except Exception as exc:  # noqa: BLE001 - the run itself is fine; report it without sharpness
                traceback.print_exc()
                log(f"[{i}/{todo}] {cell.name}: flatness failed ({type(exc).__name__}: {exc})")
        statuses[cell.name] = status
    return statuses


# -- Ray execution -----------------------------------------------------------------------------------
def run_ray(
    grid: Grid,
    out: Path,
    address: str,
    workers: int = 1,
    max_concurrent: int | None = None,
    use_gpu: bool = False,
    storage_path: str | None = None,
    max_failures: int = 1,
    flatness: bool = True,
    log=None,
) -> dict[str, str]:
    """Each pending cell becomes one Ray Tune trial, a Ray Train run of ``workers`` DDP workers (the same
    run as ``launch/ray_job.py``); up to ``max_concurrent`` at once (default: the cluster's CPUs, or GPUs
    with ``use_gpu``, over ``workers``). Each invocation is one Tune experiment,
    ``<storage>/sweep-<grid>-<UTC time>``, over the cells that are neither done nor diverged in ``out``:
    re-running an interrupted sweep trains only those, partial runs resuming from their checkpoints.
    ``out`` must be visible to every node."""
    try:
        import ray

        from .launchers.ray import RunLocation, TuneRun, connect, run_tune
    except ImportError:
        raise ConfigError("sweep --ray: Ray Train is not installed; pip install 'ssgd-dist[ray]'") from None

    log = log or _print
    out = Path(out).resolve()
    statuses: dict[str, str] = {}
    pending = []
    for cell in grid.cells:
        status = run_status(out / cell.name, cell.cfg)
        if status in ("done", "diverged", "conflict"):
            log(f"{cell.name}: {status}, skipped")
            statuses[cell.name] = status
        else:
            pending.append(cell)
    if not pending:
        return statuses
    connect(None if address == "local" else address, log_to_driver=False)
    if max_concurrent is None:
        have = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)
        max_concurrent = max(1, int(have) // max(1, workers))
    storage = storage_path or str(out / ".ray")
    trainer = {"num_workers": workers, "use_gpu": use_gpu, "max_failures": max_failures, "num_to_keep": 1}
    runs = {}
    for cell in pending:
        _write_info(out / cell.name, cell.info(grid.name))
        where = RunLocation(_slug(f"{grid.name}-{cell.name}"), storage, str(out / cell.name))
        opts = grid.flatness_for(cell) if flatness else None
        runs[cell.name] = TuneRun(cell.cfg, where, {**trainer, "flatness": opts, "diverged_as_status": True})
    log(f"sweep {grid.name}: {len(pending)} run(s) as Ray Tune trials of {workers} worker(s), {max_concurrent} at once")
    experiment = _slug(f"sweep-{grid.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    errors = run_tune(runs, storage, experiment, max_concurrent)
    for cell in pending:
        error = errors.get(cell.name, "not run")
        statuses[cell.name] = run_status(out / cell.name, cell.cfg) if error is None else f"failed ({error})"
        log(f"{cell.name}: {statuses[cell.name]}")
    return statuses


def run_sweep(
    grid: Grid,
    out: Path,
    workers: int = 1,
    ray_address: str | None = None,
    flatness: bool = True,
    report: bool = True,
    log=None,
    **ray_kwargs: Any,
) -> tuple[dict[str, str], Path | None]:
    """Run (or resume) every cell, then write ``OUT/report``; returns the statuses and the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(
        json.dumps(
            {"name": grid.name, "source": grid.source, "cells": [c.info(grid.name) for c in grid.cells]}, indent=1
        )
        + "\n"
    )
    if ray_address:
        statuses = run_ray(grid, out, ray_address, workers=workers, flatness=flatness, log=log, **ray_kwargs)
    else:
        statuses = run_local(grid, out, workers=workers, flatness=flatness, log=log)
    report_path = None
    finished = [out / c.name for c in grid.cells if statuses.get(c.name) in ("done", "diverged")]
    if report and finished:
        from .analysis.report import write_report

        report_path = write_report(finished, out / "report", title=f"{grid.name}")
    return statuses, report_path


def describe(grid: Grid, out: Path) -> str:
    lines = [f"grid {grid.name} ({grid.source}): {len(grid.cells)} run(s) -> {out}"]
    for cell in grid.cells:
        lines.append(
            f"  {cell.name:40s} {run_status(Path(out) / cell.name, cell.cfg):9s} steps={planned_steps(cell.cfg)}"
        )
    return "\n".join(lines)
