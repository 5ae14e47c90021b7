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

Checkpoints keep the plain contract (``model`` is the unwrapped module's state dict, loadable with
``torch.load(weights_only=True)``): the full state is gathered to rank 0 on the CPU (a collective), and
on resume every rank reads the file and keeps its own rows, so a run resumes on any world size.
The optimizer state is saved keyed by parameter name (``torch.distributed.checkpoint.state_dict``).
"""

from __future__ import annotations

import contextlib

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
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

from ..config import Config
from ..errors import ConfigError
from ..methods import Method
from ..optimizers import build_optimizer
from .base import Backend


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
        return super().from_config(cfg, model, build_optimizer(cfg.optim, model.parameters()))

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
        """Every rank holds the whole checkpoint and keeps its own rows: any world size resumes."""
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's own reduce-scatter, counted: calls and input bytes (what each rank sends into it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.bytes = 0

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.calls += 1
        self.bytes += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)

    def take(self) -> tuple[int, int]:
        """(bytes, calls) since the last ``take``."""
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out


def count_reduce_scatters(model: nn.Module) -> CountingReduceScatter:
    """Route every shard unit's gradient reduction of ``model`` through one counter (bench and tests)."""
    counter = CountingReduceScatter()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(counter)
    return counter
