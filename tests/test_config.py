"""Bad inputs: exit code 2, one line naming the field and the fix, no traceback, nothing written."""

import pytest

from ssgd_dist.cli import main
from ssgd_dist.config import load_config
from tests.conftest import run_cli

BAD = [
    (["--set", "noise.alpha=-0.1"], "noise.alpha"),
    (["--set", "noise.distribution=cauchy"], "noise.distribution"),
    (["--set", "noise.scale=global"], "noise.scale"),
    (["--set", "noise.targets=biases"], "noise.targets"),
    (["--set", "ssgd.batch_split=thirds"], "ssgd.batch_split"),
    (["--set", "method=adam"], "method"),
    (["--set", "model.name=resnet18"], "model.name"),
    (["--set", "data.name=imagenet"], "data.name"),
    (["--set", "data.batch_size=0"], "data.batch_size"),
    (["--set", "data.batch_size=1999"], "data.batch_size"),
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "optim.momentum=1.5"], "optim.momentum"),
    (["--set", "optim.schedule=linear"], "optim.schedule"),
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "train.precision=fp8"], "train.precision"),
    (["--set", "noise.alpah=0.3"], "did you mean 'noise.alpha'"),
    (["--set", "seed"], "KEY=VALUE"),
    (["--set", "data.batch_size=20000"], "data.batch_size"),
    (["--set", "data.name=cifar10"], "data.root"),
    (["--set", "data.name=cifar10", "--set", "data.root=/nonexistent/cifar"], "data.root"),
    (["--set", "model.name=resnet20"], "model.name"),
    (["--set", "device=cuda"], "device"),
]


@pytest.mark.parametrize("overrides, must_mention", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_exits_2_with_one_line_naming_the_field(overrides, must_mention, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", "quickstart", *overrides, "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert must_mention in err
    assert len(err.splitlines()) == 1 and err.startswith("ssgd-dist: error:")
    assert not run_dir.exists()


def test_unknown_config_name_suggests_a_packaged_one(capsys):
    assert main(["train", "--config", "quickstrat"]) == 2
    assert "did you mean 'quickstart'" in capsys.readouterr().err


def test_unknown_key_in_yaml_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("method: ssgd\nnoise: {alpha: 0.3, sigma: 1}\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "noise.sigma" in capsys.readouterr().err


def test_yaml_is_parsed_safely(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_the_process_prints_no_traceback():
    result = run_cli("train", "--config", "quickstart", "--set", "noise.alpha=abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "noise.alpha" in result.stderr


def test_overrides_parse_yaml_values():
    cfg = load_config("quickstart", ["model.hidden=[8, 4]", "optim.nesterov=true", "noise.alpha=0.05"])
    assert cfg.model.hidden == [8, 4] and cfg.optim.nesterov is True and cfg.noise.alpha == 0.05


def test_resuming_a_run_dir_with_another_config_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--config",
        "quickstart",
        "--set",
        "train.max_steps=2",
        "--set",
        "data.num_samples=1000",
        "--set",
        "data.batch_size=100",
        "--set",
        "train.progress=false",
        "--run-dir",
        str(run_dir),
    ]
    assert main(args) == 0
    before = sorted(p.name for p in run_dir.rglob("*"))
    result = run_cli(*args, "--set", "noise.alpha=0.5")
    assert result.returncode == 2
    assert "noise.alpha" in result.stderr and "different configuration" in result.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


LAUNCH_BAD = [
    (["train"], "--config"),  # argparse: the required flag is named
    (["train", "--config", "quickstart", "--bogus"], "--bogus"),
    (["report", "/nonexistent/run"], "--out"),
    (["report", "/nonexistent/run", "--out", "x"], "is not a directory"),
]


@pytest.mark.parametrize("argv, must_mention", LAUNCH_BAD, ids=[" ".join(a) for a, _ in LAUNCH_BAD])
def test_bad_command_lines_exit_2(argv, must_mention, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    assert must_mention in capsys.readouterr().err


def test_batch_that_does_not_split_over_ranks_and_halves_is_refused_under_torchrun(tmp_path):
    from tests.conftest import run_torchrun

    result = run_torchrun(
        2,
        "train",
        "--config",
        "quickstart",
        "--set",
        "data.batch_size=202",
        "--set",
        "data.num_samples=1000",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode != 0
    worker_errors = [line for line in result.stderr.splitlines() if line.startswith("ssgd-dist: error:")]
    assert len(worker_errors) == 1 and "multiple of 2 x 2 ranks = 4" in worker_errors[0]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "run").exists()
