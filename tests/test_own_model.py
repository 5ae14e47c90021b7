"""A model, data set and loss of the user's own (examples/own_model), named by import path.

The example trains on 1 rank, on 2 torchrun ranks and on 2 Ray workers (``ray job submit``) to the
same parameters; ``flatness`` imports the user's module and says so, ``report`` never imports it; a
path that does not resolve exits 2 naming the module and the attribute, before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssgd_dist.cli import main
from tests.conftest import REPO, final_params, run_torchrun, sets

pytestmark = pytest.mark.timeout(240)

MODULE = "examples.own_model.shapes"
STEPS = 8
CONFIG = str(REPO / "examples" / "own_model" / "config.yaml")
EXAMPLE = ["--config", CONFIG, *sets(f"train.max_steps={STEPS}", "train.progress=false")]


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def worst_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def outside_repo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``ssgd-dist ARGS`` run from ``tmp_path``, where the example's module cannot be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "ssgd_dist.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The example on 2 torchrun ranks (gloo), and here, in one process, as it is and with the default loss."""
    base = tmp_path_factory.mktemp("own-model")
    dirs = {name: base / name for name in ("one", "two", "default_loss")}
    proc = run_torchrun(2, "train", *EXAMPLE, "--run-dir", str(dirs["two"]))
    assert proc.returncode == 0, output(proc)
    assert main(["train", *EXAMPLE, "--run-dir", str(dirs["one"])]) == 0
    assert main(["train", *EXAMPLE, *sets("train.loss=cross_entropy"), "--run-dir", str(dirs["default_loss"])]) == 0
    return dirs


def test_same_parameters_on_one_and_two_ranks(runs):
    one, two = final_params(runs["one"]), final_params(runs["two"])
    assert worst_difference(one, two) <= 1e-5
    # The tolerance can fail: the same run with cross-entropy instead of the example's loss ends elsewhere.
    assert worst_difference(one, final_params(runs["default_loss"])) > 1e-4
    last = [json.loads(line) for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == STEPS and 0 <= last["test_acc"] <= 1


def test_report_never_imports_user_code(runs, tmp_path):
    """From a folder where the module cannot be imported, report still works: it reads files only."""
    proc = outside_repo(tmp_path, "report", str(runs["two"]), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, output(proc)
    assert (tmp_path / "report" / "report.md").is_file()


def test_flatness_says_which_module_it_imports(runs, tmp_path, capsys):
    light = ["--samples", "200", "--draws", "2", "--power-iters", "3", "--hutchinson", "2"]
    light += ["--landscape-1d", "3", "--landscape-2d", "0", "--out", str(tmp_path / "flat")]
    missing = outside_repo(tmp_path, "flatness", str(runs["two"]), *light)
    assert missing.returncode == 2, output(missing)
    assert f"cannot import module '{MODULE}'" in missing.stderr, output(missing)

    assert main(["flatness", str(runs["two"]), *light]) == 0
    said = f"importing model.name {MODULE}:build_model, data.name {MODULE}:build_data, train.loss {MODULE}:"
    assert said in capsys.readouterr().out
    assert json.loads((tmp_path / "flat" / "flatness.json").read_text())["step"] == STEPS


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"model.name={MODULE}:build_modle", f"module '{MODULE}' has no attribute 'build_modle'"),
        ("data.name=examples.own_model.nowhere:build_data", "cannot import module 'examples.own_model.nowhere'"),
        (f"train.loss={MODULE}:CLASSES", "'CLASSES' in module"),
    ],
)
def test_bad_import_path_exits_2_before_anything_is_written(tmp_path, capsys, override, message):
    assert main(["train", *EXAMPLE, "--set", override, "--run-dir", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_ray_job_refuses_a_bad_import_path_before_starting_ray(capsys):
    from ssgd_dist.launchers.ray_job import main

    args = ["--config", CONFIG, "--num-workers", "2"]
    assert main([*args, "--set", f"model.name={MODULE}:nope"]) == 2
    assert f"module '{MODULE}' has no attribute 'nope'" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_job_submit_matches_torchrun(ray_cluster, runs, tmp_path):
    """Ray workers import the module from the job's working directory and train what torchrun trained."""
    storage = tmp_path / "storage"
    entry = ["python", "launch/ray_job.py", "--num-workers", "2", *EXAMPLE, "--storage-path", str(storage)]
    proc = ray_cluster.submit([*entry, "--name", "own"], timeout=280)
    assert proc.returncode == 0, output(proc)
    assert worst_difference(final_params(storage / "own"), final_params(runs["two"])) <= 1e-5


def test_imagefolder_reads_one_subfolder_per_class(tmp_path):
    from PIL import Image

    from ssgd_dist.config import DataConfig
    from ssgd_dist.data import load_dataset
    from ssgd_dist.errors import DataError

    for split, count in (("train", 3), ("test", 1)):
        for label, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            folder = tmp_path / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10 + i, 7), colour).save(folder / f"{i}.png")
    ds = load_dataset(DataConfig(name="imagefolder", options={"root": str(tmp_path), "image_size": 6}))
    assert ds.x_train.shape == (6, 3, 6, 6) and ds.x_test.shape == (2, 3, 6, 6)
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 1] and ds.num_classes == 2
    assert torch.allclose(ds.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert bool((ds.x_test[0, 0] > ds.x_test[1, 0]).all())  # red over blue in the red channel
    with pytest.raises(DataError, match="needs train/ and test/"):
        load_dataset(DataConfig(name="imagefolder", options={"root": str(tmp_path / "train")}))
    assert (
        len(load_dataset(DataConfig(name="imagefolder", options={"root": str(tmp_path)}, train_samples=4)).y_train) == 4
    )

    # A packaged model on it: the MLP takes 3 x 6 x 6 inputs and has one output per class found.
    run = ["data.name=imagefolder", f"data.options.root={tmp_path}", "data.options.image_size=6"]
    run += ["data.batch_size=2", "data.eval_batch_size=2", "train.max_steps=3", "train.progress=false"]
    assert main(["train", "--config", "quickstart", *sets(*run), "--run-dir", str(tmp_path / "run")]) == 0
    weights = final_params(tmp_path / "run")
    assert weights["1.weight"].shape == (256, 3 * 6 * 6) and weights["5.weight"].shape == (2, 256)
