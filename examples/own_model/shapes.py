"""A model, a data set and a loss defined outside ssgd_dist, named in config.yaml by import path.

The data set draws small grey images of four shapes (a horizontal bar, a vertical bar, a diagonal, a
square) at random places in noise; item ``i`` depends only on ``(seed, i)``, as a map-style data set
read from files would. The model is a small CNN without BatchNorm; the loss is cross-entropy with label
smoothing. See docs/own-model-and-data.md for the protocol these factories follow.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

CLASSES = 4


class Shapes(Dataset):
    """``n`` images of ``size`` x ``size`` pixels; ``__getitem__`` returns ``(image 1 x size x size, label)``."""

    def __init__(self, n: int, size: int, noise: float, seed: int):
        self.n, self.size, self.noise, self.seed = n, size, noise, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(CLASSES, (), generator=gen))
        img = self.noise * torch.randn(1, self.size, self.size, generator=gen)
        r, c = (int(v) for v in torch.randint(self.size - 4, (2,), generator=gen))
        if label == 0:
            img[0, r + 2, c : c + 5] += 1.0
        elif label == 1:
            img[0, r : r + 5, c + 2] += 1.0
        elif label == 2:
            img[0, torch.arange(r, r + 5), torch.arange(c, c + 5)] += 1.0
        else:
            img[0, r : r + 5, c : c + 5] += 0.5
        return img, label


def build_data(cfg) -> tuple[Dataset, Dataset]:
    """The data factory: gets the ``data`` section; ``data.options`` holds this data set's own knobs."""
    opts = cfg.options
    size, noise = int(opts.get("size", 12)), float(opts.get("noise", 0.3))
    return Shapes(int(opts.get("train", 1600)), size, noise, seed=0), Shapes(int(opts.get("test", 400)), size, noise, 1)


def build_model(cfg) -> nn.Module:
    """The model factory: gets the ``model`` section; ``model.options`` holds this model's own knobs."""
    width = int(cfg.options.get("width", 8))
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, CLASSES),
    )


def smoothed_cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss (``train.loss``): the batch's mean cross-entropy with 10% label smoothing."""
    return nn.functional.cross_entropy(outputs, labels, label_smoothing=0.1)
