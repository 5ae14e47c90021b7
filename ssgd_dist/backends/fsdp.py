"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded.

Selected with ``backend: fsdp`` under torchrun or Ray Train (gloo on CPU, NCCL on CUDA).

Wrapping: ``fully_shard`` on every unit, then on the root. The units are the modules whose class name
is listed in ``fsdp.wrap``; by default every direct child of the model that holds parameters. A unit's
parameters are gathered together for its forward and backward and freed after, so a unit is what must
fit unsharded on one device at a time.

One gradient reduction per optimizer step: every backward but the last runs with
``set_requires_gradient_sync(False)``, so FSDP2 keeps that pass's gradient unsharded (full size) and
the last backward reduce-scatters the sum once, as FSDP SGD does. The price is that peak: one unsharded
gradient of the model between the passes (docs/performance.md measures it).

Weight noise: FSDP2 shards every tensor by dim-0 rows. The methods' ``Perturber`` sees the sharded
parameters and moves only the rows this rank holds, by the values the unsharded run adds there
(``noise.held``), so a sharded run is the same algorithm as a DDP or single-process one. Its backup
(``noise.restore: copy``) is one shard.

Precision: fp32, or bf16 through ``MixedPrecisionPolicy`` (bf16 compute and gathers, fp32 sharded
weights and gradient reduction; the noise moves the fp32 weights and is undone by copy). fp16 is
refused: its loss scaler would have to read every shard's gradient. A method that reads this rank's
unreduced gradient (SAM) is refused: FSDP2 keeps it in its own unsharded buffers. So is a split whose
ranks forward at different weights (``paired``, RWP's rank split): the ranks' perturbed shards would be
gathered into one mixed set of weights that every rank then uses.

Checkpoints (``fsdp.checkpoint``):

* ``sharded`` (the default): every checkpoint but the run's last is a directory ``step-N.dcp/`` in
  which each rank writes its own shards with ``torch.distributed.checkpoint`` (no gather, nothing
  whole on any rank), read back resharded to any world size. The run's final checkpoint is also the
  plain file below, so ``report``, ``flatness`` and users' code read ``last.pt`` as from any backend.
* ``full``: every checkpoint is the plain file: the full state gathered to rank 0 on the CPU (a
  collective), ``model`` the unwrapped module's state dict, loadable with
  ``torch.load(weights_only=True)``. On resume every rank reads the file and keeps its own rows.

Both resume on any world size, and either resumes a run that wrote the other. The optimizer state is
keyed by parameter name (``torch.distributed.checkpoint.state_dict``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from ..config import Config
from ..errors import ConfigError
from ..methods import Method
from ..noise import is_sharded
from ..optimizers import build_optimizer
from .base import Backend
from .dcp import load_tensors, save_tensors


def shard_units(model: nn.Module, wrap: list[str]) -> list[nn.Module]:
    """The modules sharded as one unit each, outermost first (``fully_shard`` then runs innermost first)."""
    if not wrap:
        return [m for m in model.children() if any(True for _ in m.parameters())]
    units = [m for m in model.modules() if type(m).__name__ in wrap and m is not model]
    missing = sorted(set(wrap) - {type(m).__name__ for m in units})
    if missing:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"fsdp.wrap names {missing}, which the model does not have; its module classes: {present}")
    return units


class FSDPBackend(Backend):
    collective_state_dict = True  # gathering the full state is a collective: every rank calls in

    @classmethod
    def check_config(cls, cfg: Config, method: type[Method]) -> None:
        if method.needs_local_gradient:
            raise ConfigError(
                f"method = {cfg.method} with backend = fsdp: its second pass reads this rank's unreduced gradient, "
                "which FSDP2 keeps in its own unsharded buffers; use backend=ddp"
            )
        if method.weights_differ_by_rank(cfg):
            raise ConfigError(
                f"method = {cfg.method} with backend = fsdp: its ranks forward at different weights in one pass "
                "(ssgd.batch_split=paired, rwp.split=ranks), but sharded ranks gather one shared set of weights; "
                "use ssgd.batch_split=halves (or rwp.split=passes), or backend=ddp"
            )
        if cfg.train.precision == "fp16":
            raise ConfigError("train.precision = fp16 with backend = fsdp is not supported; use bf16 or fp32")

    @classmethod
    def from_config(cls, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> Backend:
        """Shard ``model`` in place; ``fully_shard`` replaces its parameters, so the optimizer is built anew
        over the sharded ones (``optimizer`` only says that one is wanted)."""
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        if cfg.train.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()  # fp32 throughout: fully_shard's own default
        for unit in [*reversed(shard_units(model, cfg.fsdp.wrap)), model]:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        backend = super().from_config(cfg, model, build_optimizer(cfg.optim, model.parameters()))
        backend.sharded_checkpoints = cfg.fsdp.checkpoint == "sharded"
        return backend

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts the gathered weights and the inputs

    @contextlib.contextmanager
    def sync_context(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def state_dict(self) -> dict:
        """The full state on rank 0's CPU (the other ranks get empty dicts): the plain checkpoint format."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "model": get_model_state_dict(self.model, options=options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
        }

    def load_state_dict(self, state: dict) -> None:
        """A plain checkpoint: every rank holds the whole of it and keeps its own rows (any world size
        resumes). A sharded one (``load_sharded``) holds this rank's shards already."""
        options = StateDictOptions(full_state_dict=not any(is_sharded(t) for t in state["model"].values()))
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)

    def _sharded_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts of this rank's shards, keyed by name; the optimizer's state is
        created first if no step has made it, so a template to load into has every tensor."""
        return get_model_state_dict(self.model), get_optimizer_state_dict(self.model, self.optimizer)

    def save_sharded(self, path: Path) -> dict:
        model, optimizer = self._sharded_state()
        save_tensors({"model": model, "optimizer": optimizer["state"]}, path)
        return {"param_groups": optimizer["param_groups"]}

    def load_sharded(self, path: Path, meta: dict) -> dict:
        """Load in place: the template's tensors are the model's own shards, so a checkpoint turned down
        after loading has already moved them (the next candidate, or the refusal to start, follows)."""
        model, optimizer = self._sharded_state()
        tensors = {"model": model, "optimizer": optimizer["state"]}
        load_tensors(tensors, path)
        return {"model": model, "optimizer": {"state": tensors["optimizer"], "param_groups": meta["param_groups"]}}


class _Counted:
    """Calls and bytes of one kind of FSDP2 collective, counted on the host as they are issued."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.bytes = 0

    def _count(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()

    def take(self) -> tuple[int, int]:
        """(bytes, calls) since the last ``take``."""
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out


class CountingReduceScatter(_Counted, DefaultReduceScatter):
    """FSDP2's own reduce-scatter, counted: calls and input bytes (what each rank sends into it)."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self._count(input_tensor)
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


class CountingAllGather(_Counted, DefaultAllGather):
    """FSDP2's own weight all-gather, counted: calls and output bytes (the unsharded weights each rank gets)."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self._count(output_tensor)
        return super().__call__(output_tensor, input_tensor, group, async_op)


def count_collectives(model: nn.Module) -> tuple[CountingReduceScatter, CountingAllGather]:
    """Route every shard unit's gradient reductions and weight gathers of ``model`` through one counter each
    (bench and tests)."""
    reduce_scatters, all_gathers = CountingReduceScatter(), CountingAllGather()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(reduce_scatters)
            module.set_custom_all_gather(all_gathers)
    return reduce_scatters, all_gathers
