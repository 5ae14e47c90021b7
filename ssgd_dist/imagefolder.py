"""``data.name: imagefolder``: a folder of images, one subfolder per class, read with Pillow.

``data.options``: ``root`` (a folder holding ``train/`` and ``test/``, each with one subfolder per class;
the classes are the sorted subfolder names of ``train/``) and ``image_size`` (every image is converted
to RGB and resized to ``image_size`` x ``image_size``; default 32). Inputs are scaled to [0, 1] and
normalised per channel with the training set's mean and standard deviation. It follows the data-factory
protocol of docs/own-model-and-data.md, and like any data set here is held in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import DataConfig, validation_message
from .errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="folder holding train/ and test/, one subfolder per class in each")
    image_size: int = Field(32, ge=1, le=4096, description="images are resized to image_size x image_size")


def _read_split(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in SUFFIXES):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
            labels.append(label)
    if not images:
        raise DataError(f"data.options.root: no images ({', '.join(SUFFIXES)}) in the class folders of {folder}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.tensor(labels)


def load(cfg: DataConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) as (images N x 3 x S x S, labels) tensors."""
    try:
        opts = ImageFolderOptions.model_validate(cfg.options)
    except ValidationError as exc:
        raise DataError(
            "data.name = imagefolder: data.options: " + validation_message(exc, ["root", "image_size"])
        ) from None
    root = Path(opts.root).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"data.options.root = {opts.root}: needs train/ and test/ folders, one subfolder per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    x_train, y_train = _read_split(root / "train", classes, opts.image_size)
    x_test, y_test = _read_split(root / "test", classes, opts.image_size)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ((x_train - mean) / std, y_train), ((x_test - mean) / std, y_test)
