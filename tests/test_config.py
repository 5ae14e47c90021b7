"""Bad inputs: exit code 2, one line naming the field and the fix, no traceback, nothing written."""

import pytest

from ssgd_dist.cli import main
from ssgd_dist.config import load_config
from ssgd_dist.errors import ConfigError
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
    (["report"], "runs"),  # argparse: at least one run directory
    (["report", "/nonexistent/run"], "is not a directory"),
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


# -- hostile input: bounded and strict YAML, strict numbers (issue 17) ---------------------------------------
HOSTILE_FILES = [
    # (file content, what the one-line error must say)
    (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "deepspeed: {extra: {c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]}}\n",
        "anchors and aliases are not allowed",
    ),
    ("deepspeed: {extra: {x: " + "[" * 5000 + "]" * 5000 + "}}\n", "nested deeper than 20 levels"),
    ("# " + "x" * 300_000 + "\nseed: 1\n", "larger than 262144 bytes"),
    ("seed: 1\nnoise: {alpha: 0.3}\nseed: 2\n", "duplicate key 'seed' (first on line 1)"),
    ("noise: {alpha: .inf}\n", "noise.alpha = inf: Input should be a finite number"),
    ("optim: {lr: .nan}\n", "optim.lr = nan: Input should be a finite number"),
    ("optim: {nesterov: yes}\n", "optim.nesterov = 'yes': Input should be true or false"),
    ("model: {name: cnn1d, batchnorm: off}\n", "model.batchnorm = 'off': Input should be true or false"),
    ("seed: 0x10\n", "seed = '0x10': Input should be a valid integer"),
    ("seed: 010\n", "seed = '010': Input should be a valid integer"),
    ("seed: '7'\n", "seed = '7': Input should be a valid integer (decimal, unquoted), not text"),
    ("seed: true\n", "seed = True: Input should be a valid integer, not true/false"),
    ("noise: {alpha: true}\n", "noise.alpha = True: Input should be a valid number, not true/false"),
    ("seed: " + "9" * 5000 + "\n", "a number of 5000 characters"),
    ("false\n", "the top level must be a mapping of keys to values, not a boolean"),
    ("0\n", "the top level must be a mapping of keys to values, not a number (0)"),
    ("- seed: 1\n", "the top level must be a mapping of keys to values, not a list"),
    ("data: {root: !!binary aGVsbG8=}\n", "is not allowed"),
    ("noise: {<<: {alpha: 0.5}}\n", "unknown key 'noise.<<'"),
    ("a: 1\n---\nb: 2\n", "expected a single document"),
]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ssgd-dist: error:"), err[:500]
    assert len(err) < 600, f"{len(err)} characters"
    return err


@pytest.mark.parametrize("text, must_mention", HOSTILE_FILES, ids=[m for _, m in HOSTILE_FILES])
def test_hostile_config_files_exit_2_with_one_bounded_line(text, must_mention, tmp_path, capsys):
    path, run_dir = tmp_path / "c.yaml", tmp_path / "run"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--run-dir", str(run_dir)]) == 2
    assert must_mention in _error_line(capsys)
    assert not run_dir.exists()


def test_a_config_file_that_is_not_utf8_names_the_byte_and_line(tmp_path, capsys):
    path, run_dir = tmp_path / "c.yaml", tmp_path / "run"
    path.write_bytes("# caf\xe9\nseed: 1\n".encode("latin-1"))
    assert main(["train", "--config", str(path), "--run-dir", str(run_dir)]) == 2
    assert "not UTF-8 (byte 0xe9 on line 1); save the file as UTF-8" in _error_line(capsys)
    assert not run_dir.exists()


HOSTILE_SETS = [
    # (--set values, what the one-line error must say)
    (["seed=18446744073709551616"], "seed = 18446744073709551616: Input should fit in int64"),
    (["seed=-1"], "seed = -1: Input should be greater than or equal to 0"),
    (
        ["train.num_threads=1000000000000"],
        "train.num_threads = 1000000000000: Input should be less than or equal to 1024",
    ),
    (["model.hidden=[0]"], "model.hidden.0 = 0: Input should be greater than or equal to 1"),
    (["model.hidden=[-3]"], "model.hidden.0 = -3"),
    (["model.hidden=[100000000000]"], "model.hidden.0 = 100000000000: Input should be less than or equal to 65536"),
    (["model.hidden=[" + ",".join(["8"] * 65) + "]"], "at most 64 items"),
    (["optim.name=adamw", "optim.betas=[1.5, 0.999]"], "optim.betas.0 = 1.5: Input should be less than 1"),
    (
        ["optim.name=adamw", "optim.betas=[0.9, -0.1]"],
        "optim.betas.1 = -0.1: Input should be greater than or equal to 0",
    ),
    (["optim.betas=[0.9]"], "optim.betas.1"),
    (["optim.lr=1e308"], "optim.lr = 1e+308: Input should be within the float32 range"),
    (["optim.lr=3e38", "optim.reference_batch_size=1"], "past the float32 range"),
    (["optim.clip_grad_norm=.inf"], "optim.clip_grad_norm = inf: Input should be a finite number"),
    (["train.epochs=100000000000000000000000"], "train.epochs = 100000000000000000000000: Input should fit in int64"),
    (["data.num_samples=1000000000"], "data.num_samples = 1000000000: Input should be less than or equal to 1000000"),
    (['data.cache_dir="a\\0b"'], "data.cache_dir = 'a\\x00b': a path cannot contain a NUL character"),
    (["data.cache_dir=" + "x" * 300], "each part between slashes at most 255"),
    (["train.progress=yes"], "train.progress = 'yes': Input should be true or false"),
    (["noise.alpha=" + "x" * 100_000], "noise.alpha = 'xxxxxxxx"),
    (["x" * 100_000 + "=1"], "unknown key 'xxxxxxxx"),
    (["deepspeed.extra.=1"], "unknown key 'deepspeed.extra.'"),
    (["deepspeed.extra.a=" + "[" * 5000 + "]" * 5000], "nested deeper than 20 levels"),
    (["deepspeed.extra.a={b: 1, b: 2}"], "duplicate key 'b'"),
    (["data.root=*cifar"], "aliases are not allowed"),
]


@pytest.mark.parametrize("assignments, must_mention", HOSTILE_SETS, ids=[m[:60] for _, m in HOSTILE_SETS])
def test_hostile_set_values_exit_2_with_one_bounded_line(assignments, must_mention, tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = [arg for a in assignments for arg in ("--set", a)]
    assert (
        main(["train", "--config", "quickstart", *flags, "--set", "train.max_steps=1", "--run-dir", str(run_dir)]) == 2
    )
    assert must_mention in _error_line(capsys)
    assert not run_dir.exists()


def test_many_problems_make_one_bounded_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("noise: {" + ", ".join(f"k{i}: 1" for i in range(1000)) + "}\n")
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = _error_line(capsys)
    assert "unknown key 'noise.k0'" in err and "and 995 more problems" in err


@pytest.mark.parametrize(
    "config, must_mention", [("a" * 300, "File name too long"), (".", "not a regular file")], ids=["long", "dir"]
)
def test_config_paths_that_cannot_be_read_exit_2(config, must_mention, tmp_path, capsys):
    assert main(["train", "--config", config, "--run-dir", str(tmp_path / "run")]) == 2
    assert must_mention in _error_line(capsys)


def test_yaml_1_2_scalars_and_what_yaml_1_1_misread():
    from ssgd_dist import safe_yaml

    text = (
        "t: [true, false, True, FALSE]\nn: {a: ~, b: null, c: }\nnum: [12, -3, 0.5, .5, 1e-3, 2E5, -.inf]\n"
        "s: [yes, no, on, off, y, 0x10, 010, 0o7, 1_000, '1:30', 2024-01-01, .5.5]\n"
    )
    data = safe_yaml.load(text, "t")
    assert data["t"] == [True, False, True, False] and data["n"] == {"a": None, "b": None, "c": None}
    assert data["num"] == [12, -3, 0.5, 0.5, 0.001, 200000.0, float("-inf")]
    assert all(isinstance(v, float) for v in data["num"][2:])
    assert data["s"] == ["yes", "no", "on", "off", "y", "0x10", "010", "0o7", "1_000", "1:30", "2024-01-01", ".5.5"]
    # YAML 1.1 read '1e-8' as text: DeepSpeed settings given as --set got a string
    cfg = load_config("quickstart", ["deepspeed.extra.eps=1e-8", "data.root=2024-01-01"])
    assert cfg.deepspeed.extra["eps"] == 1e-8 and cfg.data.root == "2024-01-01"


def test_an_unreadable_file_is_one_line(tmp_path):
    from ssgd_dist import safe_yaml
    from ssgd_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot read"):
        safe_yaml.read_text(tmp_path, "--config X")  # a directory: open() fails as it would without permission


def test_the_resolved_config_reads_back_the_same_with_either_yaml_reader():
    import yaml

    from ssgd_dist import safe_yaml
    from ssgd_dist.config import dump_config

    hostile = ["data.root=yes", 'data.cache_dir="1e5"', "deepspeed.extra.a=[1, {b: 010}]"]
    cfg = load_config("quickstart", ["data.name=cifar10", "backend=deepspeed", *hostile])
    text = dump_config(cfg)
    assert safe_yaml.load(text, "t") == yaml.safe_load(text) == cfg.applicable_dict()
    assert "&" not in text and "*" not in text


def test_config_yaml_leaves_out_keys_that_do_not_apply_and_old_run_dirs_still_resume(tmp_path):
    from ssgd_dist import safe_yaml
    from ssgd_dist.config import dump_config
    from ssgd_dist.rundir import check_run_dir

    cfg = load_config("quickstart")  # S-SGD on an MLP, SGD base optimizer, cosine schedule, no DeepSpeed
    shown = safe_yaml.load(dump_config(cfg), "t")
    for section, key in [("model", "batchnorm"), ("model", "bn_mode"), ("optim", "betas"), ("optim", "milestones")]:
        assert key not in shown[section], (section, key)
    assert "sam" not in shown and "deepspeed" not in shown
    assert shown["model"]["hidden"] == [256, 256] and shown["ssgd"]["batch_split"] == "halves"
    cnn = safe_yaml.load(dump_config(load_config("quickstart", ["model.name=cnn1d"])), "t")
    assert cnn["model"]["batchnorm"] is True and "hidden" not in cnn["model"]
    # A run directory written before: every key, applicable or not, resumes; an applicable change refuses.
    (tmp_path / "config.yaml").write_text(safe_yaml.dump(cfg.to_dict()))
    check_run_dir(cfg, tmp_path)
    check_run_dir(load_config("quickstart", ["model.batchnorm=false", "sam.rho=0.1"]), tmp_path)
    with pytest.raises(ConfigError, match="model.hidden"):
        check_run_dir(load_config("quickstart", ["model.hidden=[64]"]), tmp_path)


HOSTILE_GRIDS = [
    ("base: quickstart\nseeds: [abc]\n", "seeds must be a list of integers"),
    ("base: quickstart\nseeds: [.inf]\n", "seeds must be a list of integers"),
    ("base: quickstart\nbatch_sizes: 5\n", "batch_sizes must be a list of integers"),
    ("base: quickstart\nset: 5\n", "set must be a mapping"),
    ("base: quickstart\nbatch_sizes: [100]\nbatch_set: [1]\n", "batch_set must be a mapping"),
    ("base: quickstart\nflatness: 5\n", "flatness must be a mapping"),
    ("base: quickstart\nflatness: {seeds: 5}\n", "flatness seeds must be a list of integers"),
    ("base: quickstart\nmethods: [{method: sgd, label: [1]}]\n", "bad methods entry"),
    ("base: quickstart\nname: [1]\n", "name must be text"),
    ("base: quickstart\nseeds: &s [0, 1]\nflatness: {seeds: *s}\n", "anchors and aliases are not allowed"),
    ("base: {seed: 1, seed: 2}\n", "duplicate key 'seed'"),
    ("false\n", "the top level must be a mapping of grid keys"),
]


@pytest.mark.parametrize("text, must_mention", HOSTILE_GRIDS, ids=[t.splitlines()[-1][:40] for t, _ in HOSTILE_GRIDS])
def test_hostile_sweep_grids_exit_2_with_one_line(text, must_mention, tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert must_mention in _error_line(capsys)


def test_a_run_directory_with_a_hostile_config_yaml_is_refused_not_expanded(tmp_path, capsys):
    from ssgd_dist.analysis.report import summarize_run
    from ssgd_dist.errors import ConfigError
    from ssgd_dist.sweep import run_status

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    assert run_status(run_dir, load_config("quickstart")) == "conflict"
    with pytest.raises(ConfigError, match="nested deeper than 20 levels"):
        summarize_run(run_dir)
    assert main(["train", "--config", "quickstart", "--run-dir", str(run_dir)]) == 2
    assert "config.yaml" in _error_line(capsys)
