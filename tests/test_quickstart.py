"""The README's first command, shortened: two 2-worker runs, a table and a report with a PNG."""

from PIL import Image

from tests.conftest import run_cli


def test_quickstart_trains_both_methods_and_writes_a_report(tmp_path):
    result = run_cli(
        "quickstart", "--run-dir", str(tmp_path), "--set", "train.epochs=3", "--set", "train.progress=false"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| sgd | 2000 |" in result.stdout and "| ssgd-halves | 2000 |" in result.stdout
    report = (tmp_path / "report" / "report.md").read_text()
    assert "ssgd-halves" in report
    with Image.open(tmp_path / "report" / "learning_curves.png") as img:
        img.verify()
    for method in ("sgd", "ssgd"):
        assert (tmp_path / method / "checkpoints" / "last.pt").exists()
        assert (tmp_path / method / "metrics.jsonl").read_text().count("\n") == 12
