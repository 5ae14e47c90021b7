"""A new user's first hour: the README's first command shortened, `report` without `--out`, and the CLI's
own help (every option explained, the packaged configs listed, `--version`)."""

import argparse

import pytest
from PIL import Image

from ssgd_dist import __version__
from ssgd_dist.cli import build_parser
from tests.conftest import run_cli


@pytest.mark.timeout(300)
def test_quickstart_trains_both_methods_measures_sharpness_and_writes_a_report(tmp_path):
    result = run_cli(
        "quickstart", "--run-dir", str(tmp_path), "--set", "train.epochs=3", "--set", "train.progress=false"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| sgd | 2000 |" in result.stdout and "| ssgd-halves | 2000 |" in result.stdout
    assert "λ_max" in result.stdout and "tr(H)" in result.stdout  # the quick flatness pass reached the table
    assert "top Hessian eigenvalue" in result.stdout  # flatness says what it is doing
    report = (tmp_path / "report" / "report.md").read_text()
    assert "ssgd-halves" in report and "λ_max" in report
    with Image.open(tmp_path / "report" / "learning_curves.png") as img:
        img.verify()
    for method in ("sgd", "ssgd"):
        assert (tmp_path / method / "checkpoints" / "last.pt").exists()
        assert (tmp_path / method / "metrics.jsonl").read_text().count("\n") == 12
        assert (tmp_path / method / "flatness" / "flatness.json").exists()

    # `report DIR` without --out writes DIR/report and says where.
    alone = run_cli("report", str(tmp_path / "sgd"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert (tmp_path / "sgd" / "report" / "report.md").is_file()
    assert str(tmp_path / "sgd" / "report" / "report.md") in alone.stdout


def test_every_option_of_every_command_has_help_and_train_lists_the_packaged_configs(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.items()
        for action in sub._actions
        if not action.help
    ]
    assert not undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "quickstart" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"ssgd-dist {__version__}"
