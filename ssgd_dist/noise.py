"""Seeded, rank-consistent weight noise and exact perturb/restore.

Every replica must perturb by the *same* n without talking to the others, so the noise comes from a
private ``torch.Generator`` whose seed is a pure function of ``(seed, step)``; it never touches the
global RNG, which data loading and dropout consume differently on each rank.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .seeding import Stream, step_seed, stream_seed


def noise_generator(seed: int, step: int, device: torch.device | str, sample: int = 0) -> torch.Generator:
    """The noise of optimizer ``step``: the same on every rank, drawn on the weights' device.

    ``sample`` numbers independent draws within one step (methods that average several noise samples);
    sample 0 is the stream every single-sample method has always used.
    """
    seed_of_step = stream_seed(Stream.NOISE, seed, step)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_of_step if sample == 0 else step_seed(seed_of_step, sample))
    return gen


def select_targets(model: nn.Module, targets: str) -> list[nn.Parameter]:
    """``weights``: conv/linear kernels (ndim >= 2), the usual weight-noise target; ``all``: everything."""
    params = [p for p in model.parameters() if p.requires_grad]
    if targets == "all":
        return params
    if targets == "weights":
        return [p for p in params if len(whole_shape(p)) >= 2]
    raise ValueError(f"noise.targets = {targets!r}: expected 'weights' or 'all'")


RESTORE_MODES = ("copy", "regenerate")
_SQRT3 = math.sqrt(3.0)


def _norms(ts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """L2 norms accumulated in at least fp32 (bf16/fp16 sums lose digits), float64 kept as is."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    return torch._foreach_norm(ts, 2, dtype=dtype)


def sample_unit_(ts: list[torch.Tensor], distribution: str, gen: torch.Generator) -> None:
    """Fill each tensor in place with xi (E[xi^2] = 1 per element; sphere: ||xi||^2 = numel), in order.

    Drawing straight into the destination needs no temporary; the element-wise maps are batched
    (``_foreach``) so a model's many small tensors cost a few kernels, not a few per tensor. A list
    of one tensor gives exactly the values that tensor gets inside a longer list.
    """
    if distribution == "rademacher":
        for t in ts:
            t.random_(0, 2, generator=gen)
        torch._foreach_mul_(ts, 2.0)
        torch._foreach_sub_(ts, 1.0)
    elif distribution in ("gaussian", "sphere"):
        for t in ts:
            t.normal_(generator=gen)
        if distribution == "sphere":
            norms = _norms(ts)
            for t, norm in zip(ts, norms):
                t.mul_(math.sqrt(max(1, t.numel())) / norm.clamp_min(1e-12))
    elif distribution == "uniform":
        for t in ts:
            t.uniform_(-_SQRT3, _SQRT3, generator=gen)
    else:
        raise ValueError(f"noise.distribution = {distribution!r}: expected rademacher, sphere, gaussian or uniform")


def unit_noise(
    shape: torch.Size, distribution: str, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """xi with E[xi^2] = 1 per element (sphere: exactly ||xi||^2 = numel)."""
    xi = torch.empty(shape, dtype=dtype, device=device)
    sample_unit_([xi], distribution, gen)
    return xi


def noise_scale(w: torch.Tensor, rule: str) -> torch.Tensor | float:
    """scale_i of SPEC section 1, computed from the unperturbed weights."""
    if rule == "layer_rms":
        return w.detach().float().pow(2).mean().sqrt().to(w.dtype)
    if rule == "filter_norm":
        if w.ndim < 2:
            return w.detach().float().pow(2).mean().sqrt().to(w.dtype)
        rms = w.detach().float().flatten(1).pow(2).mean(1).sqrt().to(w.dtype)
        return rms.view(-1, *([1] * (w.ndim - 1)))
    if rule == "elementwise":
        return w.detach().abs()
    if rule == "absolute":
        return 1.0
    raise ValueError(f"noise.scale = {rule!r}: expected layer_rms, filter_norm, elementwise or absolute")


def noise_sigmas(ws: list[torch.Tensor], rule: str, alpha: float) -> list[torch.Tensor | float | None]:
    """sigma_i = alpha * scale_i from the unperturbed weights, kept on their device (no host sync).

    ``layer_rms`` is one batched reduction. ``elementwise`` gives None: its sigma is a full-size
    tensor, so it is formed where it is applied, one tensor at a time.
    """
    if rule == "layer_rms":
        if not ws:
            return []
        norms = list(_norms(ws))
        torch._foreach_mul_(norms, [alpha / math.sqrt(max(1, w.numel())) for w in ws])
        return norms
    if rule == "filter_norm":
        return [noise_scale(w, rule) * alpha for w in ws]
    if rule == "elementwise":
        return [None] * len(ws)
    if rule == "absolute":
        return [float(alpha)] * len(ws)
    raise ValueError(f"noise.scale = {rule!r}: expected layer_rms, filter_norm, elementwise or absolute")


def scale_noise_(ts: list[torch.Tensor], ws: list[torch.Tensor], sigmas: list, alpha: float) -> None:
    """xi -> sigma * xi in place; ``ws`` (the unperturbed weights) are read only by ``elementwise``."""
    if sigmas and all(isinstance(s, float) for s in sigmas):
        torch._foreach_mul_(ts, sigmas)
        return
    for t, w, s in zip(ts, ws, sigmas, strict=True):
        if s is None:
            t.mul_(w.abs()).mul_(alpha)
        else:
            t.mul_(s)


def draw_noise(
    params: Iterable[torch.Tensor], distribution: str, scale: str, alpha: float, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield n_i = alpha * scale_i * xi_i one tensor at a time, so at most one noise tensor is alive.

    The values are exactly those ``Perturber.perturb`` adds for the same generator.
    """
    ws = [w.detach() for w in params]
    for w, s in zip(ws, noise_sigmas(ws, scale, alpha)):
        n = torch.empty_like(w)
        sample_unit_([n], distribution, gen)
        scale_noise_([n], [w], [s], alpha)
        yield n


def alpha_at(alpha: float, schedule: str, fraction: float, step: int, total_steps: int) -> float:
    """Noise magnitude at a step: constant, linear warm-up over ``fraction`` of the run, or cosine decay."""
    if schedule == "constant":
        return alpha
    if schedule == "warmup":
        warm = max(1, round(fraction * total_steps))
        return alpha * min(1.0, (step + 1) / warm)
    if schedule == "cosine":
        return alpha * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    raise ValueError(f"noise.schedule = {schedule!r}: expected constant, warmup or cosine")


@dataclass(frozen=True)
class Held:
    """The elements of one target tensor that this rank holds: all of it, a block of its rows (FSDP2), or a
    range of its flattened elements (DeepSpeed ZeRO-3).

    ``local`` is the tensor this rank updates in place; ``shape`` the whole tensor's; ``rows`` the dim-0 rows
    of the whole tensor that ``local`` holds; ``flat`` the elements of the whole tensor flattened that
    ``local`` (1-D) holds. Both None: ``local`` is the whole tensor.
    """

    local: torch.Tensor
    shape: torch.Size
    rows: slice | None = None
    group: dist.ProcessGroup | None = None
    flat: slice | None = None

    @property
    def sharded(self) -> bool:
        return self.rows is not None or self.flat is not None

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a tensor shaped like the whole one, shaped like ``local``."""
        if self.rows is not None:
            return whole[self.rows]
        if self.flat is not None:
            return whole.reshape(-1)[self.flat]
        return whole

    def splits(self, per_row: bool) -> bool:
        """Whether a filter (an output row if ``per_row``, else the whole tensor) may be split between ranks:
        FSDP2 keeps every row whole on one rank, ZeRO-3 cuts the flattened tensor anywhere."""
        return self.flat is not None or (self.rows is not None and not per_row)


def _loaded_dtensor():
    """``torch.distributed.tensor`` if something (FSDP) has imported it, else None: no DTensor can exist
    before, and importing it costs about a second at every process start."""
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(t: torch.Tensor) -> bool:
    module = _loaded_dtensor()
    return module is not None and isinstance(t, module.DTensor)


def is_zero3(t: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3: ``t.data`` is an empty placeholder outside forward and
    backward, and ``t.ds_tensor`` this rank's partition of the flattened tensor."""
    return getattr(t, "ds_tensor", None) is not None and hasattr(t, "ds_shape")


def whole_shape(t: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor, also for a ZeRO-3 parameter (whose own ``shape`` is its placeholder's)."""
    return t.ds_shape if is_zero3(t) else t.shape


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole value of a distributed tensor (a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def _zero3_held(p: torch.Tensor) -> Held:
    """ZeRO-3 (deepspeed/runtime/zero/partition_parameters.py, ``_partition_param``): rank r of the
    parameter's group holds flat elements [r P, (r + 1) P) of the flattened tensor in ``ds_tensor``
    (P = ``ds_tensor.numel()``, the numel rounded up to a multiple of the group size, divided by it); the
    last ranks' tail past ``ds_numel`` is padding, left out of ``local`` so it is never touched. A gathered
    parameter would forward with its gathered copy, not with the partition: it is refused, as is a
    partition that is not in memory (NVMe offload)."""
    # Statuses by name (DeepSpeed's ZeroParamStatus, PartitionedParamStatus): noise does not import DeepSpeed.
    if p.ds_status.name != "NOT_AVAILABLE" or getattr(p, "ds_secondary_tensor", None) is not None:
        raise ValueError(
            f"weight noise on a ZeRO-3 parameter of shape {tuple(p.ds_shape)} that is gathered ({p.ds_status}) or has "
            "a secondary partition: the next forward would not see its partition's noise (the backend sets "
            "stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)"
        )
    if p.ds_tensor.status.name != "AVAILABLE":
        raise ValueError(f"weight noise on a ZeRO-3 partition that is not in memory ({p.ds_tensor.status})")
    size, numel = p.ds_tensor.numel(), p.ds_numel
    start = min(dist.get_rank(group=p.ds_process_group) * size, numel)
    stop = min(start + size, numel)
    return Held(p.ds_tensor.narrow(0, 0, stop - start), p.ds_shape, group=p.ds_process_group, flat=slice(start, stop))


def held(p: torch.Tensor) -> Held:
    """What this rank holds of ``p``: FSDP2 shards dim 0 in ``torch.chunk`` blocks (the last ones may be
    short or empty), ZeRO-3 a range of the flattened elements; any other distributed layout is refused
    rather than perturbed wrongly."""
    if is_zero3(p):
        return _zero3_held(p)
    if not is_sharded(p):
        return Held(p, p.shape)
    Shard = _loaded_dtensor().Shard
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"weight noise on a parameter laid out as {p.placements} over a {mesh.ndim}-D mesh: only dim-0 "
            "sharding over one mesh dimension (FSDP2's fully_shard) is supported"
        )
    local = p.to_local()
    rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    start = min(rank * -(-rows // world), rows)
    if start + local.shape[0] > rows:
        raise ValueError(f"a shard of {tuple(local.shape)} at row {start} does not fit a tensor of {tuple(p.shape)}")
    return Held(local, p.shape, slice(start, start + local.shape[0]), mesh.get_group())


def unit_for(h: Held, distribution: str, gen: torch.Generator) -> torch.Tensor:
    """A new xi for ``h``'s elements. A shard gets its elements of the whole tensor's draw: the same values an
    unsharded run adds there, for a transient one tensor in size (torch's generators cannot skip ahead)."""
    if not h.sharded:
        xi = torch.empty_like(h.local)
        sample_unit_([xi], distribution, gen)
        return xi
    whole = torch.empty(h.shape, dtype=h.local.dtype, device=h.local.device)
    sample_unit_([whole], distribution, gen)
    return h.take(whole)


def fill_unit_(targets: list[Held], distribution: str, gen: torch.Generator) -> None:
    """xi into every target's held elements, in order (whole tensors in place, with batched maps)."""
    if not any(h.sharded for h in targets):
        sample_unit_([h.local for h in targets], distribution, gen)
        return
    for h in targets:
        h.local.copy_(unit_for(h, distribution, gen))


def _filter_numel(shape: torch.Size, per_row: bool) -> int:
    return max(1, math.prod(shape[1:]) if per_row else math.prod(shape))


def held_filter_norms(targets: list[Held], ws: list[torch.Tensor], per_row: list[bool]) -> list[torch.Tensor]:
    """The L2 norm of every filter of the whole tensors, shaped to broadcast over each target's held elements
    ``ws``: per output row (``per_row``; a row of a ZeRO-3 partition gets its row's norm element by element),
    else one for the whole tensor. Accumulated in at least fp32.

    Filters held whole here are normed locally; the others (a tensor's total over its shards, a row that
    ZeRO-3 cuts between two ranks) sum their squares over the shard group: one all-reduce of one vector,
    all targets' filters together.
    """
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in ws) else torch.float32
    out: list[torch.Tensor | None] = [None] * len(targets)
    split: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (target, squares per filter, row of each element)
    for i, (h, w, rows) in enumerate(zip(targets, ws, per_row, strict=True)):
        w = w.detach().to(dtype)
        if not h.splits(rows):
            out[i] = (
                torch.linalg.vector_norm(w.flatten(1), dim=1).view(-1, *([1] * (w.ndim - 1)))
                if rows
                else torch.linalg.vector_norm(w)
            )
        elif rows:  # ZeRO-3: the row of each held element
            row = torch.arange(h.flat.start, h.flat.stop, device=w.device) // _filter_numel(h.shape, True)
            squares = torch.zeros(h.shape[0], dtype=dtype, device=w.device).index_add_(0, row, w.square())
            split.append((i, squares, row))
        else:
            split.append((i, w.square().sum().reshape(1), None))
    if split:
        groups = {id(targets[i].group) for i, _, _ in split}
        if len(groups) != 1:
            raise ValueError("weight noise over tensors sharded over several process groups")
        squares = torch.cat([s for _, s, _ in split])
        dist.all_reduce(squares, group=targets[split[0][0]].group)
        for (i, _, row), norms in zip(split, squares.split([s.numel() for _, s, _ in split])):
            norms = norms.sqrt()
            out[i] = norms[row] if row is not None else norms.reshape(())
    return out


def held_sigmas(targets: list[Held], ws: list[torch.Tensor], rule: str, alpha: float) -> list:
    """``noise_sigmas`` of the whole tensors, from the held elements ``ws`` (unperturbed) of each target.

    Per-element rules need nothing beyond a shard, nor do per-row ones where every row is whole on one rank
    (FSDP2). A filter that shards split (a whole-tensor RMS: ``layer_rms``, ``filter_norm`` of a 1-D tensor;
    a ZeRO-3 row) sums its shards' squares (``held_filter_norms``: one small all-reduce).
    """
    per_row = [rule == "filter_norm" and len(h.shape) >= 2 for h in targets]
    if rule not in ("layer_rms", "filter_norm") or not any(h.splits(r) for h, r in zip(targets, per_row)):
        return noise_sigmas(ws, rule, alpha)
    norms = held_filter_norms(targets, ws, per_row)
    return [n * (alpha / math.sqrt(_filter_numel(h.shape, r))) for n, h, r in zip(norms, targets, per_row)]


class Perturber:
    """Moves target parameters to w + delta and back to w.

    ``restore="copy"`` (the default) holds one backup copy and restores bit-for-bit: the backup
    buffers are allocated once and reused, the noise is drawn straight into the parameters, and the
    mirror point w - delta is computed from the backup. ``"regenerate"`` keeps no copy: it remembers
    only how the noise was drawn (seed, step and the per-tensor sigmas) and draws it again to move to
    the mirror point and back, one tensor at a time; w is then restored to within rounding
    (docs/performance.md measures the drift), not bit-for-bit.

    Sharded parameters (FSDP2, DeepSpeed ZeRO-3) are handled alike on the elements this rank holds
    (``Held``): the backup, and everything else held, is one shard.
    """

    def __init__(self, params: list[torch.Tensor], restore: str = "copy"):
        if restore not in RESTORE_MODES:
            raise ValueError(f"noise.restore = {restore!r}: expected 'copy' or 'regenerate'")
        self.params = params
        self.restore_mode = restore
        self._backup: list[torch.Tensor] | None = None
        self._drawn: tuple | None = None  # regenerate: (seed, step, sample, distribution, sigmas, alpha)
        self._sign = 1.0
        self.active = False

    def _held(self) -> list[Held]:
        # Looked up at every use: FSDP2 may rebind a parameter's local shard when it (re)initialises, and
        # ZeRO-3 moves its partitions into the optimizer's flat buffers.
        return [held(p) for p in self.params]

    def _locals(self) -> list[torch.Tensor]:
        return [h.local for h in self._held()]

    def save(self) -> None:
        if self.restore_mode != "copy":
            raise RuntimeError("Perturber(restore='regenerate') keeps no copy of the weights; use perturb()")
        with torch.no_grad():  # in place on the parameters themselves: no per-call detach()
            local = self._locals()
            if self._backup is None:
                self._backup = [t.clone() for t in local]
            else:
                torch._foreach_copy_(self._backup, local)
        self.active = True

    def add(self, deltas: Iterable[torch.Tensor], sign: float = 1.0) -> None:
        """w <- w + sign * delta after ``save``; ``deltas`` may be a generator so each delta is freed after use.
        Each delta covers the elements this rank holds (``held``): the whole tensor unless it is sharded."""
        if self.restore_mode != "copy":
            raise RuntimeError("Perturber(restore='regenerate') can only undo noise it drew itself; use perturb()")
        with torch.no_grad():
            for h, delta in zip(self._held(), deltas, strict=True):
                h.local.add_(delta, alpha=sign)

    def perturb(
        self,
        seed: int,
        step: int,
        distribution: str,
        scale: str,
        alpha: float,
        sign: float = 1.0,
        sample: int = 0,
    ) -> None:
        """w <- w + sign * n, n drawn on the weights' device from the generator of (seed, step, sample)."""
        if not self.params:
            return
        with torch.no_grad():
            targets = self._held()
            gen = noise_generator(seed, step, targets[0].local.device, sample)
            if self.restore_mode == "copy":
                self.save()
                assert self._backup is not None
                local = [h.local for h in targets]
                sigmas = held_sigmas(targets, self._backup, scale, alpha)
                fill_unit_(targets, distribution, gen)  # xi straight into the parameters
                scale_noise_(local, self._backup, sigmas, alpha)
                if sign < 0:
                    torch._foreach_neg_(local)
                torch._foreach_add_(local, self._backup)
                return
            if scale == "elementwise":
                raise ValueError(
                    "noise.restore = regenerate with noise.scale = elementwise: noise scaled by |w| cannot be "
                    "undone without a copy of w; use noise.scale=layer_rms/filter_norm/absolute or noise.restore=copy"
                )
            sigmas = held_sigmas(targets, [h.local for h in targets], scale, alpha)
            self._drawn = (seed, step, sample, distribution, sigmas, alpha)
            self._sign = sign
            self._add_drawn(sign)
            self.active = True

    def _add_drawn(self, coefficient: float) -> None:
        """Regenerate mode: w <- w + coefficient * n, drawing n again one tensor at a time."""
        assert self._drawn is not None
        seed, step, sample, distribution, sigmas, alpha = self._drawn
        targets = self._held()
        gen = noise_generator(seed, step, targets[0].local.device, sample)
        with torch.no_grad():
            for h, s in zip(targets, sigmas):
                n = unit_for(h, distribution, gen)
                scale_noise_([n], [h.local], [s], alpha)
                h.local.add_(n, alpha=coefficient)
                del n  # before the next one is allocated: one noise tensor alive at a time

    def reflect(self) -> None:
        """w + delta -> w - delta: mirrored through the saved w (2 w - (w + delta)), or by subtracting 2 delta."""
        assert self.active
        if self.restore_mode == "regenerate":
            self._add_drawn(-2.0 * self._sign)
            self._sign = -self._sign
            return
        assert self._backup is not None
        with torch.no_grad():
            local = self._locals()
            torch._foreach_mul_(local, -1.0)
            torch._foreach_add_(local, self._backup, alpha=2.0)

    def restore(self) -> None:
        """Copy mode: bit-for-bit the weights seen by ``save`` (a copy, never a subtraction)."""
        if not self.active:
            return
        if self.restore_mode == "regenerate":
            self._add_drawn(-self._sign)
            self._drawn = None
            self.active = False
            return
        assert self._backup is not None
        with torch.no_grad():
            torch._foreach_copy_(self._locals(), self._backup)
        self.active = False
