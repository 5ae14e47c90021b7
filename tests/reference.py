"""Independent references for the tests: the documented noise, re-derived with plain torch calls.

What README and SPEC section 1 document: at optimizer step t, every perturbed tensor w_i (``noise.targets``
``weights``: the tensors with ndim >= 2, in the model's parameter order) moves by n_i = alpha * scale_i * xi_i,
drawn tensor after tensor from one private ``torch.Generator`` seeded with ``seeding.step_seed(seed, t)``
(the weight-noise stream, never the global RNG). xi: ``rademacher`` +-1 per element (a fair bit b, 2b - 1),
``gaussian`` N(0, 1), ``uniform`` on [-sqrt 3, sqrt 3]; ``layer_rms`` scale: sqrt(mean(w_i^2)).

Only ``step_seed`` (the documented seed derivation) comes from the package; nothing here calls
``ssgd_dist.noise``, so a bug there cannot cancel out of a comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from ssgd_dist.seeding import step_seed


def noise(
    model: nn.Module,
    distribution: str,
    seed: int,
    step: int,
    alpha: float,
    targets: str = "weights",
    sample: int = 0,
    scale: str = "layer_rms",
) -> dict[str, torch.Tensor]:
    """parameter name -> n_i for the perturbed tensors of ``model`` at its current weights (``layer_rms`` or
    ``absolute`` scale). Noise sample j > 0 of a step (methods that draw several) is seeded with
    ``step_seed(step_seed(seed, step), j)``."""
    seed_of_step = step_seed(seed, step)
    gen = torch.Generator().manual_seed(seed_of_step if sample == 0 else step_seed(seed_of_step, sample))
    out = {}
    for name, w in model.named_parameters():
        if targets == "weights" and w.ndim < 2:
            continue
        if distribution == "rademacher":
            xi = torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).float() * 2 - 1
        elif distribution == "gaussian":
            xi = torch.randn(w.shape, generator=gen)
        elif distribution == "uniform":
            xi = (torch.rand(w.shape, generator=gen) * 2 - 1) * 3**0.5
        else:
            raise ValueError(distribution)
        sigma = {"layer_rms": w.detach().pow(2).mean().sqrt(), "absolute": 1.0}[scale]
        out[name] = alpha * sigma * xi
    return out


def tensor_noise(w: torch.Tensor, distribution: str, seed: int, step: int, alpha: float) -> torch.Tensor:
    """n for a single perturbed tensor (the first and only one its generator draws for)."""
    holder = nn.Module()
    holder.w = nn.Parameter(w.detach().clone())
    return noise(holder, distribution, seed, step, alpha, targets="all")["w"]
