"""Data sets held as tensors, and a world-size-invariant global batch order.

Every data set here fits in memory, so there is no DataLoader: each epoch is one seeded permutation
of the training set, global batch t is a fixed slice of it, and rank r takes a contiguous part of
that slice. The order is therefore a pure function of (seed, step), which makes 1 rank and R ranks
see the same batches and makes resuming at a step exact.
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import imagefolder, usercode
from .config import DataConfig
from .errors import ConfigError, DataError
from .seeding import Stream, generator


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop + flip for images

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def default_cache_dir() -> Path:
    if os.environ.get("SSGD_CACHE_DIR"):
        return Path(os.environ["SSGD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssgd-dist"


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def _mnist1d_cache(cfg: DataConfig) -> Path:
    """The cache folder, checked: a file there (or a parent that is a file) is a user mistake (exit 2)."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    which = "data.cache_dir" if cfg.cache_dir else "the data cache (SSGD_CACHE_DIR, else ~/.cache/ssgd-dist)"
    if cache.exists() and not cache.is_dir():
        raise DataError(f"{which} = {cache}: is a file, not a directory; point it at a directory")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{which} = {cache}: cannot create it ({exc.strerror or exc}); point it at a directory you can write"
        ) from None
    return cache


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with a warning line) when the file is damaged: it is then regenerated."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in MNIST1D_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        print(
            f"ssgd-dist: warning: cached data set {path} is damaged ({type(exc).__name__}); regenerating it",
            file=sys.stderr,
            flush=True,
        )
        return None


def load_mnist1d(cfg: DataConfig) -> Dataset:
    """Generated procedurally (mnist1d's ``get_dataset`` would try a download first); cached as .npz."""
    path = _mnist1d_cache(cfg) / f"mnist1d-{cfg.num_samples}.npz"
    arrays = _read_npz(path) if path.exists() else None
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = cfg.num_samples
        state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
        raw = make_dataset(args)
        np.random.set_state(state)
        _atomic_savez(path, **{k: raw[k] for k in MNIST1D_KEYS})
        with np.load(path, allow_pickle=False) as f:  # the saved arrays, exactly as a later run reads them
            arrays = {k: f[k] for k in MNIST1D_KEYS}
    return Dataset(
        "mnist1d",
        torch.from_numpy(arrays["x"]).float(),
        torch.from_numpy(arrays["y"]).long(),
        torch.from_numpy(arrays["x_test"]).float(),
        torch.from_numpy(arrays["y_test"]).long(),
        num_classes=10,
    )


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1 797 images), a fixed 80/20 split, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.data).float() / 16.0
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return Dataset("digits", x[:split], y[:split], x[split:], y[split:], num_classes=10)


def load_synthetic(num_samples: int = 2048, dim: int = 32, classes: int = 4) -> Dataset:
    """Gaussian inputs labelled by a fixed random teacher: learnable, tiny, no files."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, dim, generator=gen)
    teacher = torch.randn(dim, classes, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(num_samples, classes, generator=gen)).argmax(1)
    split = int(0.8 * num_samples)
    return Dataset("synthetic", x[:split], y[:split], x[split:], y[split:], num_classes=classes)


CIFAR_LAYOUT = {
    # name: (subdirectory, train files, test files, label bytes, label byte used, classes)
    "cifar10": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 0, 10),
    "cifar100": ("cifar-100-binary", ["train.bin"], ["test.bin"], 2, 1, 100),
}
CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
CIFAR_URL = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
}


def _read_cifar_files(paths: list[Path], label_bytes: int, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    record = label_bytes + 3072
    chunks = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DataError(
                f"data.root: {path} has {raw.size} bytes, not a multiple of the {record}-byte CIFAR record; "
                "the file is truncated or not in the CIFAR binary format"
            )
        chunks.append(raw.reshape(-1, record))
    rows = np.concatenate(chunks)
    labels = torch.from_numpy(rows[:, label_index].astype(np.int64))
    images = torch.from_numpy(rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    return images, labels


def load_cifar(cfg: DataConfig) -> Dataset:
    """The official *binary* release (no pickle), from a directory the user provides."""
    subdir, train_files, test_files, label_bytes, label_index, classes = CIFAR_LAYOUT[cfg.name]
    if cfg.root is None:
        raise DataError(
            f"data.root is not set: {cfg.name} is read from a local directory; download "
            f"{CIFAR_URL[cfg.name]}, extract it and pass --set data.root=DIR"
        )
    root = Path(cfg.root).expanduser()
    base = root / subdir if (root / subdir).is_dir() else root
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"data.root = {cfg.root}: {', '.join(missing)} not found (looked in {base}); download "
            f"{CIFAR_URL[cfg.name]} and extract it there (the binary version, not the Python one)"
        )
    x_train, y_train = _read_cifar_files([base / f for f in train_files], label_bytes, label_index)
    x_test, y_test = _read_cifar_files([base / f for f in test_files], label_bytes, label_index)
    if int(max(y_train.max(), y_test.max())) >= classes:
        raise DataError(f"data.root = {cfg.root}: labels above {classes - 1}; is this {cfg.name}?")

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - CIFAR_MEAN) / CIFAR_STD

    return Dataset(cfg.name, normalise(x_train), y_train, normalise(x_test), y_test, classes, augment=cfg.augment)


def _as_tensors(part: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair of tensors (inputs, labels) as it is; a map-style data set read once, item by item, and
    stacked (``default_collate``): held in memory like every data set here (docs/own-model-and-data.md)."""
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, torch.Tensor) for t in part):
        x, y = part
    elif hasattr(part, "__len__") and hasattr(part, "__getitem__") and len(part) > 0:
        x, y = torch.utils.data.default_collate([part[i] for i in range(len(part))])
    else:
        raise DataError(
            f"{what}: a {type(part).__name__}; expected a pair of tensors (inputs, labels) or a non-empty map-style "
            "data set (__len__, __getitem__ returning (input, label))"
        )
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels")
    return (x.float() if x.is_floating_point() else x), y


def from_factory(name: str, result: object) -> Dataset:
    """The (train, test) a data factory returned, as tensors; the class count from integer labels."""
    what = f"data.name = '{name}': the factory's"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"{what} result is a {type(result).__name__}; expected a pair (train, test)")
    x_train, y_train = _as_tensors(result[0], f"{what} train")
    x_test, y_test = _as_tensors(result[1], f"{what} test")
    labels = torch.cat([y_train.reshape(len(y_train), -1), y_test.reshape(len(y_test), -1)])
    classes = int(labels.max()) + 1 if not labels.is_floating_point() else labels.shape[1]
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=classes)


def load_dataset(cfg: DataConfig) -> Dataset:
    if usercode.is_import_path(cfg.name):
        ds = from_factory(cfg.name, usercode.resolve(cfg.name, "data.name")(cfg))
    elif cfg.name == "imagefolder":
        ds = from_factory(cfg.name, imagefolder.load(cfg))
    elif cfg.name == "mnist1d":
        ds = load_mnist1d(cfg)
    elif cfg.name == "digits":
        ds = load_digits()
    elif cfg.name == "synthetic":
        ds = load_synthetic()
    else:
        ds = load_cifar(cfg)
    if cfg.train_samples is not None:
        if cfg.train_samples > len(ds.y_train):
            raise DataError(
                f"data.train_samples = {cfg.train_samples}: {ds.name} has only {len(ds.y_train)} training examples"
            )
        ds.x_train, ds.y_train = ds.x_train[: cfg.train_samples], ds.y_train[: cfg.train_samples]
    return ds


class GlobalBatches:
    """Global batch t of epoch e is ``perm_e[t*B:(t+1)*B]``; each rank takes its part.

    By default rank r takes the r-th contiguous block, which the backend cuts into k micro-steps: a
    rank's samples do not depend on k (what SAM and ``paired``, which work per rank, need). With
    ``micro_major`` the global batch is first k consecutive micro-batches and rank r takes the r-th
    slice of each, so micro-step j sees the same samples at any world size (what ``bn_mode: sync``
    needs). Incomplete last batches are dropped so every step has the same global batch size.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        micro_steps: int = 1,
        micro_major: bool = False,
    ):
        if global_batch > num_examples:
            raise ConfigError(
                f"data.batch_size = {global_batch}: larger than the {num_examples} training examples; "
                "lower data.batch_size or use more data"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        if micro_major:
            micro, piece = global_batch // micro_steps, global_batch // (micro_steps * world_size)
            starts = torch.arange(micro_steps) * micro + rank * piece
            self.positions = (starts[:, None] + torch.arange(piece)[None, :]).reshape(-1)
        else:
            self.positions = rank * self.local_batch + torch.arange(self.local_batch)
        self.steps_per_epoch = num_examples // global_batch
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = generator(Stream.DATA_ORDER, self.seed, epoch)
            self._perm = torch.randperm(self.num_examples, generator=gen)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, t = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[t * self.global_batch : (t + 1) * self.global_batch]

    def local_indices(self, step: int) -> torch.Tensor:
        return self.global_indices(step)[self.positions]


def augment_images(x: torch.Tensor, seed: int, step: int, positions: torch.Tensor, global_batch: int) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, drawn for the whole global batch, then those of
    ``positions`` (the samples' places in the global batch) taken: the same for any world size."""
    gen = generator(Stream.AUGMENT, seed, step)
    shifts = torch.randint(0, 9, (global_batch, 2), generator=gen)[positions]
    flips = torch.rand(global_batch, generator=gen)[positions] < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(len(x)):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        img = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = img.flip(-1) if flips[i] else img
    return out
