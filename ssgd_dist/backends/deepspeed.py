"""DeepSpeed engine: a method's passes are micro-steps of one engine step, reduced once.

Selected with ``backend: deepspeed``; DeepSpeed's settings live under ``deepspeed.*``
(``zero_stage``, ``bf16``, and ``extra``, a dict merged into the generated DeepSpeed config).

How one optimizer step runs (two passes for S-SGD ``halves``/``full``, one for the others):

* ``sync: boundary`` (ZeRO 0 and 1): ``gradient_accumulation_steps`` is the number of backwards
  (passes x ``train.accumulation_steps``); ``set_gradient_accumulation_boundary(False)`` before every
  backward but the last and ``(True)`` before the last, so the engine reduces only in the last one.
  Measured: one reduction per step.
* ``sync: coalesce`` (ZeRO 2 and 3): ZeRO-2 and ZeRO-3 reduce in every backward, boundary or not (two
  reductions per S-SGD step with the trick above, measured), so the passes run inside
  ``engine.coalesce_grad_reduction()`` (``gradient_accumulation_steps: 1``): gradients stay local and the
  block's exit reduces once.
  A DeepSpeed without that API falls back to ``boundary`` with a warning (two reductions per step).

Losses go to ``engine.backward(loss * pass.loss_weight / k, scale_wrt_gas=False)``: the engine does not
divide by its accumulation steps, so the accumulated gradient is exactly the method's (for S-SGD
1/2 (g+ + g-)), and DeepSpeed's reduction averages it over the ranks, as DDP does.

Weights: under ZeRO 1/2 the module's parameters are views into one flat buffer, so the methods'
``Perturber`` (in-place ``add_``/``_foreach`` ops, restore by ``copy_`` from a backup, never by
subtraction) moves exactly the weights the engine forwards with, and puts bf16 weights back bit for
bit. The fp32 master weights live in DeepSpeed's optimizer and are never perturbed.

ZeRO-3 partitions the parameters themselves: ``p.data`` is an empty placeholder outside forward and
backward, and rank r holds flat elements [r P, (r+1) P) of each flattened parameter in ``p.ds_tensor``.
The ``Perturber`` moves exactly those elements, by the values the unsharded run adds there
(``noise.held``; scales that span ranks sum their squares in one small all-reduce), and restores them by
copy. For the next forward to gather the perturbed partitions, no parameter may stay gathered between
passes: the generated config sets ``stage3_param_persistence_threshold``, ``stage3_max_reuse_distance``
and ``stage3_prefetch_bucket_size`` to 0 (``deepspeed.extra`` may not set them; with DeepSpeed's defaults
the small and the reused parameters stay gathered, and ``noise.held`` refuses to perturb them). That
costs ZeRO-3 its overlap of gathers with compute. A method whose ranks forward at different weights
(``paired``, RWP's rank split) is refused: the ranks gather one shared set of weights. hpZ, MiCS and
parameter offload (other copies of the weights) are refused.

A method that ``needs_local_gradient`` (SAM) is refused on every stage: it reads this rank's
*unreduced* gradient in ``p.grad``, which DeepSpeed's ZeRO and bf16 optimizers move into their own
buffers.

DeepSpeed counts micro-steps and samples its own way (the boundary trick makes it count twice);
the trainer's own step counter is the one that matters, and nothing here reads DeepSpeed's.

Checkpoints (``state_dict``) are plain tensors, loadable with ``torch.load(weights_only=True)``:
``model`` is the module's state dict with every parameter as its fp32 master weight; ``optimizer``
is the base optimizer's ``torch.optim`` state dict (per-parameter state, gathered from the ZeRO
partitions), the same format the DDP backend writes; ZeRO 0 with bf16 stores DeepSpeed's own
(plain) fp16-optimizer state dict instead. Gathering ZeRO 1/2/3 state is a collective, so every rank
calls ``state_dict()`` (``collective_state_dict``); the trainer saves rank 0's copy. Resuming sets each
rank's partitions from the full tensors, so any world size resumes. Under ZeRO-3 the module's own
``state_dict()`` gathers the weights too (a hook replaces the placeholders; a collective): the trainer
checks a checkpoint's shapes against it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..errors import ConfigError, NonFiniteError
from ..methods import Method, method_class
from ..noise import held, is_zero3, whole_shape
from .base import Backend, StepResult

SUPPORTED_STAGES = (0, 1, 2, 3)
SYNC_MODES = ("boundary", "coalesce")
# Keys of the DeepSpeed config that the backend derives itself; ``deepspeed.extra`` may not set them.
OWNED_KEYS = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "the method (its passes are the micro-steps)",
    "optimizer": "optim.* (the backend hands DeepSpeed the torch optimizer built from it)",
    "scheduler": "optim.schedule (the trainer sets the LR at every step)",
    "gradient_clipping": "optim.clip_grad_norm",
}
# ZeRO-3 keys the backend sets (or refuses) so that every parameter is partitioned whenever the noise moves it:
# the next forward then gathers the perturbed partitions. A parameter kept gathered (persistent, reused,
# prefetched) would forward with its stale gathered copy; a secondary (hpZ) or MiCS partition is another copy.
ZERO3_KEYS = {
    "stage3_param_persistence_threshold": 0,
    "stage3_max_reuse_distance": 0,
    "stage3_prefetch_bucket_size": 0,
}
ZERO3_REFUSED = {
    "zero_hpz_partition_size": "ZeRO++ hpZ forwards from a secondary copy of the partitions",
    "mics_shard_size": "MiCS shards over its own groups, which the noise does not know",
    "offload_param": "the noise moves the in-memory partition; offloaded partitions are not supported",
    "cpu_offload_param": "the noise moves the in-memory partition; offloaded partitions are not supported "
    "(cpu_offload_param is DeepSpeed's old name for offload_param)",
}


def default_sync_mode(zero_stage: int) -> str:
    """The mode that gives one gradient reduction per optimizer step (measured; see docs/deepspeed.md): ZeRO 2
    and 3 reduce in every backward, accumulation boundary or not, so they coalesce."""
    return "coalesce" if zero_stage >= 2 else "boundary"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def check_deepspeed_config(cfg: Config, method: type[Method]) -> None:
    """Everything the DeepSpeed path refuses, as one-line errors naming the key and the fix."""
    ds = cfg.deepspeed
    extra = ds.extra or {}
    stage = ds.zero_stage
    extra_stage = (
        (extra.get("zero_optimization") or {}).get("stage")
        if isinstance(extra.get("zero_optimization"), dict)
        else None
    )
    if extra_stage is not None and extra_stage != stage:
        raise ConfigError(
            f"deepspeed.extra.zero_optimization.stage = {extra_stage!r} disagrees with deepspeed.zero_stage = {stage}; "
            f"set deepspeed.zero_stage={extra_stage} instead"
        )
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(f"deepspeed.zero_stage = {stage}: supported: deepspeed.zero_stage=0, 1, 2 or 3")
    for key, owner in OWNED_KEYS.items():
        if key in extra:
            raise ConfigError(f"deepspeed.extra.{key}: set by the backend from {owner}; remove it from deepspeed.extra")
    if stage == 3:
        check_zero3(cfg, method, extra.get("zero_optimization") or {})
    if method.needs_local_gradient:
        raise ConfigError(
            f"method = {cfg.method} with backend = deepspeed: its second pass needs this rank's unreduced gradient "
            f"in p.grad, which DeepSpeed's ZeRO/bf16 optimizers move into their own buffers; use backend=ddp"
        )
    if cfg.train.precision == "fp16" or _enabled(extra.get("fp16")):
        raise ConfigError(
            "train.precision = fp16 (or deepspeed.extra.fp16) with backend = deepspeed is not supported; "
            "use deepspeed.bf16=true (or train.precision=bf16), or fp32"
        )
    if extra.get("bf16") is not None and not isinstance(extra.get("bf16"), dict):
        raise ConfigError(
            "deepspeed.extra.bf16: expected a mapping such as {enabled: true}; or use deepspeed.bf16=true"
        )


def check_zero3(cfg: Config, method: type[Method], zero: dict[str, Any]) -> None:
    """What ZeRO-3's partitioned parameters cannot run: the noise moves this rank's partition, so every
    rank must forward at the same weights, and the partition must be what the next forward gathers."""
    if method.weights_differ_by_rank(cfg):
        raise ConfigError(
            f"method = {cfg.method} with deepspeed.zero_stage = 3: its ranks forward at different weights in one pass "
            "(ssgd.batch_split=paired, rwp.split=ranks), but ZeRO-3 ranks gather one shared set of weights; "
            "use ssgd.batch_split=halves (or rwp.split=passes), or deepspeed.zero_stage=0, 1 or 2"
        )
    for key in ZERO3_KEYS:
        if key in zero:
            raise ConfigError(
                f"deepspeed.extra.zero_optimization.{key}: set to {ZERO3_KEYS[key]} by the backend under ZeRO-3 (a "
                "parameter kept gathered between passes would not forward with its noise); remove it"
            )
    for key, why in ZERO3_REFUSED.items():
        value = zero.get(key)
        if isinstance(value, dict):
            value = value.get("device", "none")
        # Off: absent, false, "none", or a partition size of 0, 1 or -1 (hpZ, MiCS). ``True == 1``, so booleans first.
        if value is True or (value is not False and value not in (None, 0, 1, -1, "none")):
            raise ConfigError(
                f"deepspeed.extra.zero_optimization.{key} = {value!r} with deepspeed.zero_stage = 3: {why}; remove it"
            )


def uses_bf16(cfg: Config) -> bool:
    return bool(cfg.deepspeed.bf16 or cfg.train.precision == "bf16" or _enabled(cfg.deepspeed.extra.get("bf16")))


def build_ds_config(cfg: Config, world_size: int, sync_mode: str, clip_in_engine: bool) -> dict[str, Any]:
    """The DeepSpeed config: batch bookkeeping, ZeRO stage, precision; then ``deepspeed.extra`` on top."""
    passes = len(method_class(cfg).plan(cfg)) * cfg.train.accumulation_steps
    gas = passes if sync_mode == "boundary" else 1
    local = max(1, cfg.data.batch_size // max(1, world_size))
    micro = max(1, local // gas)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            **(ZERO3_KEYS if cfg.deepspeed.zero_stage == 3 else {}),
        },
        "zero_allow_untested_optimizer": True,  # the torch SGD/AdamW/LARS built from optim.*
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
        "gradient_clipping": float(cfg.optim.clip_grad_norm or 0.0) if clip_in_engine else 0.0,
    }
    if uses_bf16(cfg):
        # check_grad_overflow: a non-finite gradient skips the step (ZeRO 1/2) instead of corrupting weights.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return _merge(ds, cfg.deepspeed.extra or {})


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        # DeepSpeed picks its accelerator once, at first use; on a CPU run it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it; torchrun, Ray and `deepspeed` set it
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            f"backend = deepspeed: DeepSpeed is not importable ({exc}); "
            "install it with pip install 'ssgd-dist[deepspeed]'"
        ) from None
    return deepspeed


class DeepSpeedBackend(Backend):
    """S-SGD on a DeepSpeed engine (ZeRO 0 to 3, fp32 or bf16), one gradient reduction per step."""

    check_config = staticmethod(check_deepspeed_config)

    @classmethod
    def from_config(cls, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> DeepSpeedBackend:
        return cls(
            cfg,
            model,
            optimizer,
            clip_grad_norm=cfg.optim.clip_grad_norm,
            on_nonfinite=cfg.train.on_nonfinite,
            micro_steps=cfg.train.accumulation_steps,
        )

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str = "fp32",
        clip_grad_norm: float | None = None,
        on_nonfinite: str = "stop",
        micro_steps: int = 1,
        sync_mode: str | None = None,
    ):
        self.bf16 = uses_bf16(cfg)
        # The base class must not build a GradScaler: DeepSpeed owns mixed precision here.
        super().__init__(
            model,
            optimizer,
            precision="fp32",
            clip_grad_norm=clip_grad_norm,
            on_nonfinite=on_nonfinite,
            micro_steps=micro_steps,
        )
        self.precision = "bf16" if self.bf16 else "fp32"
        self.zero_stage = cfg.deepspeed.zero_stage
        self.sync_mode = sync_mode or default_sync_mode(self.zero_stage)
        if self.sync_mode not in SYNC_MODES:
            raise ConfigError(f"sync_mode = {self.sync_mode!r}: expected one of {', '.join(SYNC_MODES)}")
        if self.sync_mode == "coalesce" and self.zero_stage == 0:
            raise ConfigError(
                "sync_mode = coalesce needs ZeRO 1, 2 or 3 (DeepSpeed's coalesce_grad_reduction); use boundary"
            )

        device = next(model.parameters()).device
        deepspeed = _import_deepspeed(device)
        if self.sync_mode == "coalesce" and not hasattr(deepspeed.DeepSpeedEngine, "coalesce_grad_reduction"):
            warnings.warn(
                f"DeepSpeed {deepspeed.__version__} has no engine.coalesce_grad_reduction(): ZeRO-{self.zero_stage} "
                "falls back to the accumulation-boundary trick, which reduces gradients once per pass "
                "(upgrade DeepSpeed for one reduction per step)",
                stacklevel=2,
            )
            self.sync_mode = "boundary"
        if not dist.is_initialized():
            # One process on its own: a one-rank group, so the engine's collectives have somewhere to go.
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        world_size = dist.get_world_size()

        # ZeRO 0 in fp32 hands the torch optimizer through untouched: clip exactly as the DDP backend
        # does (torch's clip_grad_norm_ on the synced .grad). Everywhere else DeepSpeed owns the
        # gradients, so it clips them (gradient_clipping) and reports the norm.
        self.plain = self.zero_stage == 0 and not self.bf16
        self.ds_config = build_ds_config(cfg, world_size, self.sync_mode, clip_in_engine=not self.plain)
        # Original parameter order of the optimizer: the index space of a torch optimizer state dict.
        self._opt_params: list[nn.Parameter] = [p for g in optimizer.param_groups for p in g["params"]]
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.model = self.engine.module
        self.optimizer = self.engine.optimizer
        self.device_type = device.type
        self.collective_state_dict = self.zero_stage > 0
        if self.zero_stage == 3:
            # The module's own state_dict would hold ZeRO-3's empty placeholders; the trainer reads it (shapes to
            # check a checkpoint against), so it holds the gathered weights instead (a collective).
            self.model.register_state_dict_post_hook(gather_zero3_parameters)

    # -- Backend hooks -----------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.engine

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Only for callers that drive passes themselves: mark the accumulation boundary (boundary mode)."""
        if self.sync_mode == "boundary":
            self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def zero_grad(self) -> None:
        if self.plain:
            self.engine.zero_grad()
        else:
            self.engine.optimizer.zero_grad()

    def autocast(self) -> contextlib.AbstractContextManager:
        # DeepSpeed's bf16 runs the whole module in bf16; the engine turns an outer CUDA autocast off
        # inside its forward (unless its own torch_autocast section is on), so the inputs are cast instead.
        return contextlib.nullcontext()

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 weights need bf16 inputs (DeepSpeed casts inputs itself only for fp16)."""
        return x.to(torch.bfloat16) if self.bf16 and x.is_floating_point() else x

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def step_scope(self) -> contextlib.AbstractContextManager:
        """ZeRO-2/3 reduce in every backward: coalescing keeps both passes local until the scope exits."""
        return self.engine.coalesce_grad_reduction() if self.sync_mode == "coalesce" else contextlib.nullcontext()

    def optimizer_step(self) -> StepResult:
        engine = self.engine
        if self.plain:
            norm, skipped = self.clipped_norm([p for p in self.model.parameters() if p.grad is not None])
            if skipped:
                engine.zero_grad()
            else:
                engine.step()
            return StepResult(loss=float("nan"), grad_norm=norm, skipped=skipped)
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None  # None: the engine was told not to compute it
        skipped = not engine.was_step_applied()
        if skipped and self.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite gradient (DeepSpeed skipped the step; gradient norm {norm})")
        return StepResult(loss=float("nan"), grad_norm=norm, skipped=skipped)

    # -- checkpoints -------------------------------------------------------------------------------
    def _partitioned_groups(self) -> list[tuple[list[nn.Parameter], torch.Tensor]] | None:
        """(parameters, this rank's flat fp32 partition) per group, for optimizers that partition state."""
        opt = self.engine.optimizer
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 (DeepSpeedZeroOptimizer_Stage3), fp32 or bf16
            return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat))
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1/2 (DeepSpeedZeroOptimizer)
            return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups))
        if hasattr(opt, "fp32_groups_flat_partition"):  # ZeRO 1 + bf16 with fp32 accumulation (BF16_Optimizer)
            return list(zip(opt.bf16_groups, opt.fp32_groups_flat_partition))
        return None

    def state_dict(self) -> dict:
        """Plain tensors only. Collective under ZeRO 1/2/3: every rank must call it, in step."""
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.plain:
            return {"model": model_state, "optimizer": self.engine.optimizer.state_dict()}
        groups = self._partitioned_groups()
        if groups is None:  # ZeRO 0 + bf16: DeepSpeed's fp16/bf16 optimizer, whole state on every rank
            opt = self.engine.optimizer
            sd = opt.state_dict()
            sd["fp32_groups"] = [[t.detach().clone() for t in group] for group in sd["fp32_groups"]]
            masters = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
            for p in self._opt_params:
                if id(p) in masters:
                    model_state[self._names[id(p)]] = masters[id(p)].detach().clone().reshape(p.shape)
            return {"model": model_state, "optimizer": sd}
        return {"model": model_state, "optimizer": self._gather_partitioned(groups, model_state)}

    def _gather_partitioned(self, groups, model_state: dict) -> dict:
        """The base optimizer's state as ``torch.optim`` would hold it unpartitioned (DDP's format).

        Per-element state of the flat partition (momentum, Adam's moments) is gathered parameter by
        parameter with DeepSpeed's ``safe_get_full_*`` (an all-reduce each); scalars such as Adam's
        ``step`` are shared by a group. The fp32 master weights go into ``model_state``.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = self.engine.optimizer.optimizer
        where = {id(p): (flat, base.state.get(flat, {})) for params, flat in groups for p in params}
        state: dict[int, dict[str, Any]] = {}
        for index, p in enumerate(self._opt_params):
            if id(p) not in where:
                continue
            flat, flat_state = where[id(p)]
            entry = {}
            for key, value in flat_state.items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    entry[key] = safe_get_full_optimizer_state(p, key).detach().to(torch.float32).clone()
                else:
                    entry[key] = value.detach().clone() if torch.is_tensor(value) else value
            if entry:
                state[index] = entry
            model_state[self._names[id(p)]] = safe_get_full_fp32_param(p).detach().clone()
        param_groups, offset = [], 0
        for group, (params, _) in zip(base.param_groups, groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            param_groups.append({**hyper, "params": list(range(offset, offset + len(params)))})
            offset += len(params)
        return {"state": state, "param_groups": param_groups}

    def _load_module_state(self, model_state: dict) -> None:
        """The module's weights and buffers from full tensors. ZeRO-3: each rank copies its partition's
        elements into its partition (``noise.held``); buffers are not partitioned."""
        if self.zero_stage < 3:
            self.model.load_state_dict(model_state)  # copies into the engine's (flat-buffer) parameters
            return
        params = dict(self.model.named_parameters())
        missing, unexpected = self.model.load_state_dict(
            {k: v for k, v in model_state.items() if k not in params}, strict=False
        )
        absent = sorted(set(missing) - set(params) | set(params) - set(model_state))
        if unexpected or absent:
            raise RuntimeError(f"the checkpoint does not fit the model: unexpected keys {unexpected}, missing {absent}")
        with torch.no_grad():
            for name, p in params.items():
                h = held(p)
                h.local.copy_(h.take(model_state[name].to(h.local.device)))

    def _set_master(self, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """The fp32 master weight (``key`` None) or optimizer state ``key`` of ``p`` from its full value.

        ZeRO-3's own full-tensor setter slices the value at rank x partition size, which runs past the end of
        a tensor whose size does not divide by the ranks; the local setter gets the padded partition instead.
        """
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        value = value.to(p.device, torch.float32)
        if self.zero_stage < 3:
            if key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
            return
        h = held(p)
        partition = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.device)
        partition[: h.local.numel()] = h.take(value)
        if key is None:
            safe_set_local_fp32_param(p, partition)
        else:
            safe_set_local_optimizer_state(p, partition, key)

    def load_state_dict(self, state: dict) -> None:
        model_state, opt_state = state["model"], state["optimizer"]
        self._load_module_state(model_state)
        groups = self._partitioned_groups()
        if groups is None:  # ZeRO 0: the torch optimizer, or DeepSpeed's fp16/bf16 one (restores masters too)
            self.engine.optimizer.load_state_dict(opt_state)
            return
        for p in self._opt_params:
            if self._names[id(p)] in model_state:
                self._set_master(p, model_state[self._names[id(p)]])
        saved = {int(k): v for k, v in opt_state.get("state", {}).items()}
        index_of = {id(p): i for i, p in enumerate(self._opt_params)}
        base = self.engine.optimizer.optimizer
        # A fresh engine has no optimizer state before its first step: create the flat tensors the
        # base optimizer would create, and let DeepSpeed link each parameter to its fragment.
        for params, flat in groups:
            owner = next((p for p in params if index_of.get(id(p)) in saved), None)
            if owner is None:
                continue
            flat_state = base.state.setdefault(flat, {})
            for key, value in saved[index_of[id(owner)]].items():
                if key in flat_state:
                    continue
                if torch.is_tensor(value) and value.shape == whole_shape(owner):
                    flat_state[key] = torch.zeros_like(flat)
                elif torch.is_tensor(value):
                    # torch keeps Adam's step on the CPU unless the optimizer is capturable or fused
                    flat_state[key] = value.detach().clone().to("cpu" if key == "step" else flat.device)
                else:
                    flat_state[key] = value
        if hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 fragments
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()
        for p in self._opt_params:
            for key, value in saved.get(index_of[id(p)], {}).items():
                if torch.is_tensor(value) and value.shape == whole_shape(p):
                    self._set_master(p, value, key)
        for group, saved_group in zip(base.param_groups, opt_state.get("param_groups", [])):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def gather_zero3_parameters(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: every ZeRO-3 parameter's placeholder replaced by its whole value, all-gathered from
    the partitions (rank r's are flat elements [r P, (r+1) P), padded at the end; see ``noise.held``). A
    collective: every rank calls ``state_dict()`` together, as the trainer does."""
    for name, p in module.named_parameters():
        if prefix + name not in state or not is_zero3(p):
            continue
        parts = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size(group=p.ds_process_group))]
        dist.all_gather(parts, p.ds_tensor, group=p.ds_process_group)
        state[prefix + name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
