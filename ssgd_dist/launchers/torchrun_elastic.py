"""The launch rules of an elastic torchrun (``--nnodes=MIN:MAX``), checked where the range is known.

torchrun re-forms the group with any number of nodes from MIN to MAX and does not tell the workers the
range, so each worker can only check its own world size when it starts (``backends.check_launch``, run
again at every restart: a size that cannot split the batch exits 2 there). A launcher that knows the
range (``ssgd-dist k8s`` rendering an elastic PyTorchJob) checks every size before anything starts.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .elastic import first_refused_size, not_world_size_invariant


def _splits(cfg: Config, batch: int, sizes: list[int]) -> bool:
    candidate = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": batch})})
    return first_refused_size(candidate, sizes) is None


def _nearest_batches(cfg: Config, sizes: list[int]) -> str:
    """The batch sizes closest to ``cfg``'s (one below, one above) that every size in ``sizes`` accepts."""
    b = cfg.data.batch_size
    below = next((c for c in range(b - 1, 0, -1) if _splits(cfg, c, sizes)), None)
    above = next((c for c in range(b + 1, 4 * b + 1) if _splits(cfg, c, sizes)), None)
    return " or ".join(str(c) for c in (below, above) if c is not None) or "none within 4x"


def check_node_range(cfg: Config, min_nodes: int, max_nodes: int, nproc: int, what: str) -> None:
    """Refuse (``ConfigError``, exit 2) a config that some group of ``MIN..MAX`` nodes x ``nproc`` cannot run.

    Every size must pass the batch rules; a true range also needs a trajectory that does not depend on
    the world size (SPEC's invariance table), since a re-formed group resumes the run on its own size.
    ``what`` names the setting in the message (a flag, or a manifest's fields).
    """
    if not 1 <= min_nodes <= max_nodes or nproc < 1:
        raise ConfigError(f"{what}: needs 1 <= min <= max nodes and at least 1 process per node")
    if min_nodes < max_nodes and (why := not_world_size_invariant(cfg)) is not None:
        raise ConfigError(
            f"{what}: an elastic group re-forms on another number of ranks and resumes the run there, which "
            f"changes this run's trajectory: {why}; or use a fixed number of nodes"
        )
    sizes = [nodes * nproc for nodes in range(min_nodes, max_nodes + 1)]
    refused = first_refused_size(cfg, sizes)
    if refused is None:
        return
    size, exc = refused
    if len(sizes) == 1:
        raise ConfigError(f"{what}: {exc}") from None
    raise ConfigError(
        f"{what} forms groups of {', '.join(map(str, sizes))} ranks; at {size}: {exc}; "
        f"a data.batch_size that every one of them splits: {_nearest_batches(cfg, sizes)}"
    ) from None
