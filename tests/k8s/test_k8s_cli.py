"""``ssgd-dist k8s``: an overlay rendered with the user's image and a validated config, nothing else changed."""

from __future__ import annotations

import k8s_checks as kc
import pytest
import yaml
from k8s_checks import OVERLAYS

from ssgd_dist.cli import main
from ssgd_dist.config import dump_config, validate
from ssgd_dist.errors import ConfigError
from ssgd_dist.launchers.k8s import split_image

IMAGE = "registry.internal:5000/team/ssgd-dist:1.2.3"
DIGEST = "sha256:" + "ab" * 32


def containers(objs):
    return [c for obj in objs for _, spec in kc.pod_specs(obj) for c in spec.get("containers", [])]


def shipped_config(objs) -> dict:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ssgd-config"]
    return yaml.safe_load(cm["data"]["config.yaml"])


def render_cli(tmp_path, *args) -> list[dict]:
    out = tmp_path / "manifests.yaml"
    assert main(["k8s", *args, "--out", str(out)]) == 0
    return [o for o in yaml.safe_load_all(out.read_text()) if o]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_and_overrides_reach_the_manifests_and_nothing_else_changes(rendered, overlay, tmp_path):
    objs = render_cli(tmp_path, overlay, "--image", IMAGE, "--set", "noise.alpha=0.45", "--set", "train.epochs=7")
    assert {c["image"] for c in containers(objs)} == {IMAGE}
    plain = rendered[overlay]
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [(o["kind"], o["metadata"]["name"]) for o in plain]
    # The overlay's config as the renderer writes any config (dump_config may leave out keys that act on
    # nothing in the run), so that only the --set keys can differ.
    cfg, original = (
        validate(shipped_config(objs)),
        validate(yaml.safe_load(dump_config(validate(shipped_config(plain))))),
    )
    assert (cfg.noise.alpha, cfg.train.epochs) == (0.45, 7)
    assert cfg.model == original.model and cfg.data == original.data and cfg.device == original.device
    for obj in objs:
        for path, spec in kc.pod_specs(obj):
            assert kc.policy_violations(spec) == [], (obj["kind"], path)


def test_a_packaged_config_replaces_the_overlays_and_an_image_digest_pins_it(rendered, tmp_path):
    objs = render_cli(tmp_path, "cpu-smoke", "--config", "quickstart", "--image", f"ghcr.io/org/ssgd@{DIGEST}")
    assert {c["image"] for c in containers(objs)} == {f"ghcr.io/org/ssgd@{DIGEST}"}
    cfg = validate(shipped_config(objs))
    assert cfg.data.name == "mnist1d" and cfg.model.name == "mlp"


def test_without_options_it_is_the_overlay_itself(rendered, tmp_path):
    assert render_cli(tmp_path, "rayjob") == rendered["rayjob"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["rayjob", "--set", "noise.alpah=1"], "did you mean 'noise.alpha'"),
        (["rayjob", "--set", "data.batch_size=-4"], "data.batch_size"),
        (["no-such-overlay"], "expected one of cpu-smoke, pytorchjob, rayjob, torchrun-job"),
        (["rayjob", "--config", "missing.yaml"], "no such file"),
        (["rayjob", "--image", "registry.internal:5000/team/ssgd-dist"], "give a version tag or a digest"),
        # The elastic PyTorchJob forms 1 or 2 pods x 4 processes; its smallest group cannot split 3364.
        (
            ["pytorchjob", "--set", "data.batch_size=3364"],
            "forms groups of 4, 8 ranks; at 4: data.batch_size = 3364: 'halves' needs every rank's batch to split "
            "in two, so a multiple of 2 x 4 ranks = 8; nearest: 3360 or 3368; a data.batch_size that every one "
            "of them splits: 3360 or 3376",
        ),
        (["pytorchjob", "--set", "model.bn_mode=local"], "model.bn_mode = local normalises each rank's slice"),
        (["pytorchjob", "--set", "method=sam"], "re-forms on another number of ranks"),
        (["rayjob", "--set", "data.batch_size=4096"], "--num-workers 4-8 includes 5 workers"),
        (["rayjob", "--set", "ssgd.batch_split=paired"], "ssgd.batch_split = paired pairs the ranks"),
        (["torchrun-job", "--set", "data.batch_size=3364"], "Job ssgd-torchrun: NNODES 2 x NPROC_PER_NODE 4"),
    ],
)
def test_bad_input_fails_before_anything_is_written(rendered, tmp_path, capsys, args, message):
    out = tmp_path / "manifests.yaml"
    assert main(["k8s", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "ref, entry",
    [
        ("reg.io/team/ssgd:1.0", {"newName": "reg.io/team/ssgd", "newTag": "1.0"}),
        ("localhost:5000/ssgd:2", {"newName": "localhost:5000/ssgd", "newTag": "2"}),  # a port, then a tag
        (f"localhost:5000/ssgd@{DIGEST}", {"newName": "localhost:5000/ssgd", "digest": DIGEST}),
        (f"reg.io/ssgd:1.0@{DIGEST}", {"newName": "reg.io/ssgd", "newTag": "1.0", "digest": DIGEST}),
    ],
)
def test_image_references_split_as_kustomize_expects(ref, entry):
    assert split_image(ref) == entry


@pytest.mark.parametrize(
    "ref", ["ssgd", "localhost:5000/ssgd", "reg.io/ssgd:latest", "reg.io/ssgd:", "reg.io/ssgd@", "a b:1"]
)
def test_image_references_without_a_fixed_version_are_refused(ref):
    with pytest.raises(ConfigError, match="--image"):
        split_image(ref)
