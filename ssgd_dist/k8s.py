"""``ssgd-dist k8s``: one of the kustomize overlays, rendered with your image and a validated config.

    ssgd-dist k8s rayjob --image registry.io/team/ssgd-dist:1.2 --set noise.alpha=0.5 > rayjob.yaml
    ssgd-dist k8s torchrun-job --config my-experiment.yaml --out job.yaml

It is ``kubectl kustomize`` on a small kustomization layered over ``k8s/overlays/NAME``: an
``images`` entry for the ``ssgd-dist`` image and, when ``--config``/``--set`` are given, the
``ssgd-config`` ConfigMap replaced by the resulting configuration. The configuration is validated
here first, with the same errors as ``ssgd-dist train``, so a typo fails on your machine rather
than in a pod. What kustomize does not know (node and GPU counts) stays in the overlay's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from .config import ConfigError, dump_config, override, read_config_yaml

IMAGE_PLACEHOLDER = "ssgd-dist"  # the image name the overlays' manifests use
CONFIG_MAP = "ssgd-config"
CONFIG_KEY = "config.yaml"


def default_k8s_dir() -> Path:
    """The manifests beside the package: a clone, or an editable install of one."""
    return Path(__file__).resolve().parents[1] / "k8s"


def overlays(k8s_dir: Path) -> list[str]:
    root = k8s_dir / "overlays"
    return sorted(p.name for p in root.iterdir() if (p / "kustomization.yaml").is_file()) if root.is_dir() else []


def split_image(ref: str) -> dict[str, str]:
    """A kustomize ``images`` entry from REGISTRY/NAME[:TAG][@DIGEST] (a registry port is not a tag)."""
    entry: dict[str, str] = {}
    name, _, digest = ref.partition("@")
    if digest:
        entry["digest"] = digest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, entry["newTag"] = name.rsplit(":", 1)
    if not name or any(c.isspace() for c in ref):
        raise ConfigError(f"--image {ref!r}: expected REGISTRY/NAME[:TAG][@sha256:DIGEST]")
    return {"newName": name, **entry}


def kustomize(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ConfigError("ssgd-dist k8s: kubectl is not on PATH (it renders the kustomize overlays); install kubectl >= 1.27")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def placeholder_name(overlay_dir: Path) -> str:
    """What the overlay renames the ``ssgd-dist`` placeholder to: the name our ``images`` entry must match."""
    spec = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text()) or {}
    for image in spec.get("images") or []:
        if image.get("name") == IMAGE_PLACEHOLDER:
            return image.get("newName", IMAGE_PLACEHOLDER)
    return IMAGE_PLACEHOLDER


def overlay_config(rendered: str) -> dict:
    """The training config an overlay ships in its ``ssgd-config`` ConfigMap."""
    for obj in yaml.safe_load_all(rendered):
        if obj and obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == CONFIG_MAP:
            return yaml.safe_load(obj["data"][CONFIG_KEY]) or {}
    raise ConfigError(f"the overlay has no ConfigMap {CONFIG_MAP!r} with {CONFIG_KEY!r} to base --set on")


def render(overlay: str, image: str | None = None, config: str | None = None, overrides: list[str] | None = None,
           k8s_dir: Path | None = None) -> str:  # fmt: skip
    """The overlay's manifests as ``kubectl apply -f`` takes them; see the module docstring."""
    k8s_dir = Path(k8s_dir) if k8s_dir else default_k8s_dir()
    names = overlays(k8s_dir)
    if not names:
        raise ConfigError(f"--k8s-dir {k8s_dir}: no overlays (expected {k8s_dir}/overlays/NAME/kustomization.yaml)")
    if overlay not in names:
        raise ConfigError(f"overlay {overlay!r}: expected one of {', '.join(names)}")
    overlay_dir = k8s_dir / "overlays" / overlay
    spec: dict = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    config_text = None
    if config is not None or overrides:
        data = read_config_yaml(config) if config is not None else overlay_config(kustomize(overlay_dir))
        config_text = dump_config(override(data, overrides))
        spec["configMapGenerator"] = [{"name": CONFIG_MAP, "behavior": "replace", "files": [CONFIG_KEY]}]
        spec["generatorOptions"] = {"disableNameSuffixHash": True}  # the overlays mount it by this name
    if image is not None:
        spec["images"] = [{"name": placeholder_name(overlay_dir), **split_image(image)}]
    with tempfile.TemporaryDirectory(prefix="ssgd-k8s-") as tmp:
        # kustomize takes only relative paths to other kustomizations
        spec["resources"] = [os.path.relpath(overlay_dir.resolve(), tmp)]
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        if config_text is not None:
            (Path(tmp) / CONFIG_KEY).write_text(config_text)
        return kustomize(Path(tmp))
