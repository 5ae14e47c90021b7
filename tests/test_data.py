import numpy as np
import pytest
import torch

from ssgd_dist.config import DataConfig, ModelConfig
from ssgd_dist.data import GlobalBatches, load_dataset
from ssgd_dist.errors import DataError
from ssgd_dist.methods import select_part
from ssgd_dist.models import build_model


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = GlobalBatches(1000, 200, seed=3)
    for step in (0, 4, 5, 17):  # across epoch boundaries
        parts = [GlobalBatches(1000, 200, seed=3, rank=r, world_size=4).local_indices(step) for r in range(4)]
        assert torch.equal(torch.cat(parts), one.local_indices(step))
        plus_one, plus_four = (
            select_part(one.local_indices(step), "even"),
            torch.cat([select_part(p, "even") for p in parts]),
        )
        assert set(plus_one.tolist()) == set(plus_four.tolist())  # the w+n set is the same for 1 and 4 ranks


def test_each_epoch_is_a_permutation_and_epochs_differ():
    b = GlobalBatches(1000, 100, seed=0)
    epoch0 = torch.cat([b.global_indices(t) for t in range(10)])
    epoch1 = torch.cat([b.global_indices(t) for t in range(10, 20)])
    assert sorted(epoch0.tolist()) == list(range(1000))
    assert not torch.equal(epoch0, epoch1)


def test_mnist1d_is_generated_offline_and_cached(data_cache):
    ds = load_dataset(DataConfig(name="mnist1d", num_samples=1000))
    assert ds.x_train.shape == (800, 40) and ds.x_test.shape == (200, 40)
    assert (data_cache / "mnist1d-1000.npz").exists()
    again = load_dataset(DataConfig(name="mnist1d", num_samples=1000))
    assert torch.equal(again.x_train, ds.x_train)


def test_digits_and_synthetic_and_train_samples():
    digits = load_dataset(DataConfig(name="digits", train_samples=100))
    assert digits.x_train.shape == (100, 64) and digits.num_classes == 10
    synth = load_dataset(DataConfig(name="synthetic"))
    assert len(synth.y_train) > len(synth.y_test) > 0


def write_fake_cifar10(root, per_file=10):
    base = root / "cifar-10-batches-bin"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(base / name)
    return base


def test_cifar10_binary_format_is_read(tmp_path):
    base = write_fake_cifar10(tmp_path)
    raw = np.fromfile(base / "data_batch_1.bin", dtype=np.uint8).reshape(-1, 3073)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert ds.y_train[:10].tolist() == raw[:10, 0].tolist()
    red = torch.from_numpy(raw[0, 1:1025].astype(np.float32)).view(32, 32) / 255
    torch.testing.assert_close(ds.x_train[0, 0] * 0.2470 + 0.4914, red)


def test_cifar100_binary_format_uses_the_fine_label(tmp_path):
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    for name, n in (("train.bin", 6), ("test.bin", 3)):
        rows = np.zeros((n, 3074), dtype=np.uint8)
        rows[:, 0], rows[:, 1] = 7, np.arange(n) + 90
        rows.tofile(base / name)
    ds = load_dataset(DataConfig(name="cifar100", root=str(base)))
    assert ds.y_train.tolist() == [90, 91, 92, 93, 94, 95] and ds.num_classes == 100


def test_cifar_errors_say_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    base = write_fake_cifar10(tmp_path / "trunc")
    with open(base / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "trunc")))


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "vgg16_bn", "wrn16_4"])
def test_image_models_produce_logits(name):
    model = build_model(ModelConfig(name=name), (3, 32, 32), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_cnn1d_batchnorm_switch(batchnorm):
    model = build_model(ModelConfig(name="cnn1d", batchnorm=batchnorm), (40,), 10)
    assert model(torch.randn(4, 40)).shape == (4, 10)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == batchnorm
