"""Elastic worker counts: a range ``MIN-MAX`` of ranks, checked before anything is started.

A run that shrinks or grows continues from its newest checkpoint on another number of ranks, so it may
only use a configuration whose trajectory does not depend on the world size (docs/methods.md, the
invariance table): every other combination is refused here with the reason, and the batch-size rules
of ``backends.check_launch`` are checked for every size the range allows.
"""

from __future__ import annotations

from ..backends import check_launch
from ..config import Config
from ..errors import ConfigError
from ..methods import method_class


def parse_workers(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"1-2"`` -> (1, 2). Refuses anything else (``ConfigError``)."""
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ConfigError(f"--num-workers {text}: give a number of workers (4) or a range MIN-MAX (2-4)") from None
    if bounds[0] < 1 or bounds[0] > bounds[1]:
        raise ConfigError(f"--num-workers {text}: needs 1 <= MIN <= MAX")
    return bounds


def not_world_size_invariant(cfg: Config) -> str | None:
    """Why ``cfg``'s trajectory depends on the number of ranks; None when it does not."""
    why = method_class(cfg).rank_dependence(cfg)
    if why is None and cfg.model.has_batchnorm and cfg.model.bn_mode == "local":
        why = "model.bn_mode = local normalises each rank's slice; use bn_mode=ghost (or sync)"
    return why


def first_refused_size(cfg: Config, sizes: list[int]) -> tuple[int, ConfigError] | None:
    """The first world size in ``sizes`` that ``backends.check_launch`` refuses for ``cfg``, and why; or None."""
    for size in sizes:
        try:
            check_launch(cfg, size)
        except ConfigError as exc:
            return size, exc
    return None


def check_workers(cfg: Config, low: int, high: int) -> None:
    """Refuse (``ConfigError``) a worker count or range that ``cfg`` cannot run on, before anything starts."""
    if low != high:
        why = not_world_size_invariant(cfg)
        if why is not None:
            raise ConfigError(
                f"--num-workers {low}-{high}: an elastic run resumes on another number of ranks, which changes "
                f"this run's trajectory: {why}; or give a fixed number of workers"
            )
    refused = first_refused_size(cfg, list(range(low, high + 1)))
    if refused is not None:
        size, exc = refused
        if low == high:
            raise exc
        raise ConfigError(f"--num-workers {low}-{high} includes {size} workers: {exc}") from None
