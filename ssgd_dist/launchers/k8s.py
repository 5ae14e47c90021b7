"""``ssgd-dist k8s``: one of the kustomize overlays, rendered with your image and a validated config.

    ssgd-dist k8s rayjob --image registry.io/team/ssgd-dist:1.2 --set noise.alpha=0.5 > rayjob.yaml
    ssgd-dist k8s torchrun-job --config my-experiment.yaml --out job.yaml

It is ``kubectl kustomize`` on a small kustomization layered over ``k8s/overlays/NAME``: an
``images`` entry for the overlay's one image and, when ``--config``/``--set`` are given, the
``ssgd-config`` ConfigMap replaced by the resulting configuration. The configuration is validated
here first, with the same errors as ``ssgd-dist train``, so a typo fails on your machine rather
than in a pod. What kustomize does not know (node and GPU counts) stays in the overlay's files;
every world size those counts let the workload form (all of an elastic range) is checked against the
configuration, and a range needs one whose trajectory does not depend on the world size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, dump_config, override, parse_yaml_mapping, read_config_yaml, validate
from ..errors import ConfigError
from .elastic import check_workers, parse_workers
from .torchrun_elastic import check_node_range

CONFIG_MAP = "ssgd-config"
CONFIG_KEY = "config.yaml"


def default_k8s_dir() -> Path:
    """The manifests beside the package: a clone, or an editable install of one."""
    return Path(__file__).resolve().parents[2] / "k8s"


def overlays(k8s_dir: Path) -> list[str]:
    root = k8s_dir / "overlays"
    return sorted(p.name for p in root.iterdir() if (p / "kustomization.yaml").is_file()) if root.is_dir() else []


def split_image(ref: str) -> dict[str, str]:
    """A kustomize ``images`` entry from REGISTRY/NAME:TAG[@DIGEST] or REGISTRY/NAME@DIGEST.

    A registry port is not a tag. An image with neither means ``:latest``, which the manifests'
    policy refuses (the pods would run whatever was pushed last), so it is an error here too.
    """
    entry: dict[str, str] = {}
    name, _, digest = ref.partition("@")
    if digest:
        entry["digest"] = digest
    if ":" in name.rsplit("/", 1)[-1]:
        name, entry["newTag"] = name.rsplit(":", 1)
    if not name or any(c.isspace() for c in ref) or "" in entry.values():
        raise ConfigError(f"--image {ref!r}: expected REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST")
    if not entry or entry.get("newTag") == "latest":
        raise ConfigError(
            f"--image {ref!r}: give a version tag or a digest "
            "(no tag means :latest, which can change under a running job)"
        )
    return {"newName": name, **entry}


def container_images(obj: Any) -> Iterator[str]:
    """Every container image in a rendered object, whatever kind nests the pod spec (Job, RayJob...)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c["image"] for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from container_images(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from container_images(value)


def image_name(image: str) -> str:
    """REGISTRY/NAME without tag or digest: what a kustomize ``images`` entry matches."""
    name = image.partition("@")[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def kustomize(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ConfigError(
            "ssgd-dist k8s: kubectl is not on PATH (it renders the kustomize overlays); install kubectl >= 1.27"
        )
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def overlay_config(objs: list[dict]) -> dict:
    """The training config an overlay ships in its ``ssgd-config`` ConfigMap."""
    for obj in objs:
        if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == CONFIG_MAP:
            return parse_yaml_mapping(
                obj["data"][CONFIG_KEY], f"the overlay's {CONFIG_MAP} {CONFIG_KEY}", "keys to values"
            )
    raise ConfigError(f"the overlay has no ConfigMap {CONFIG_MAP!r} with {CONFIG_KEY!r} to base --set on")


def _arg(args: list[str], flag: str) -> str | None:
    """The value of ``--flag=V`` or ``--flag V`` in a command line."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def check_launch_sizes(objs: list[dict], cfg: Config) -> None:
    """Refuse (exit 2) a config that a workload in ``objs`` cannot run on every world size it can form.

    The sizes come from the manifests: an elastic PyTorchJob's ``elasticPolicy`` replica range times
    ``nprocPerNode``, a RayJob's ``--num-workers`` (a number or a range MIN-MAX), the Indexed Job's
    ``NNODES`` x ``NPROC_PER_NODE``. A range also needs a world-size-invariant configuration.
    """
    for obj in objs:
        kind, name, spec = obj.get("kind"), obj["metadata"]["name"], obj.get("spec") or {}
        if kind == "PyTorchJob" and "elasticPolicy" in spec:
            policy, nproc = spec["elasticPolicy"], int(spec.get("nprocPerNode", 1))
            low, high = policy.get("minReplicas", 1), policy.get("maxReplicas", 1)
            what = f"PyTorchJob {name}: elasticPolicy minReplicas {low} to maxReplicas {high} x nprocPerNode {nproc}"
            check_node_range(cfg, low, high, nproc, what)
        elif kind == "RayJob" and (workers := _arg(str(spec.get("entrypoint", "")).split(), "--num-workers")):
            check_workers(cfg, *parse_workers(workers))
        elif kind == "Job":
            env = {e["name"]: e.get("value") for c in spec["template"]["spec"]["containers"] for e in c.get("env", [])}
            if str(env.get("NNODES", "")).isdigit() and str(env.get("NPROC_PER_NODE", "")).isdigit():
                nodes, nproc = int(env["NNODES"]), int(env["NPROC_PER_NODE"])
                check_node_range(cfg, nodes, nodes, nproc, f"Job {name}: NNODES {nodes} x NPROC_PER_NODE {nproc}")


def render(
    overlay: str,
    image: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    k8s_dir: Path | None = None,
) -> str:
    """The overlay's manifests as ``kubectl apply -f`` takes them; see the module docstring."""
    k8s_dir = Path(k8s_dir) if k8s_dir else default_k8s_dir()
    names = overlays(k8s_dir)
    if not names:
        raise ConfigError(f"--k8s-dir {k8s_dir}: no overlays (expected {k8s_dir}/overlays/NAME/kustomization.yaml)")
    if overlay not in names:
        raise ConfigError(f"overlay {overlay!r}: expected one of {', '.join(names)}")
    overlay_dir = k8s_dir / "overlays" / overlay
    plain = [obj for obj in yaml.safe_load_all(kustomize(overlay_dir)) if obj]
    spec: dict = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    config_text = None
    if config is not None or overrides:
        cfg = override(read_config_yaml(config) if config is not None else overlay_config(plain), overrides)
        config_text = dump_config(cfg)
        spec["configMapGenerator"] = [{"name": CONFIG_MAP, "behavior": "replace", "files": [CONFIG_KEY]}]
        spec["generatorOptions"] = {"disableNameSuffixHash": True}  # the overlays mount it by this name
    if image is not None:
        images = sorted({image_name(i) for i in container_images(plain)})
        if len(images) != 1:
            raise ConfigError(
                f"--image: overlay {overlay!r} runs {len(images)} images ({', '.join(images)}); expected one to replace"
            )
        spec["images"] = [{"name": images[0], **split_image(image)}]
    check_launch_sizes(plain, cfg if config_text is not None else validate(overlay_config(plain)))
    with tempfile.TemporaryDirectory(prefix="ssgd-k8s-") as tmp:
        root = Path(tmp).resolve()  # kustomize resolves links in its root; the relative path must agree
        spec["resources"] = [os.path.relpath(overlay_dir.resolve(), root)]  # kustomize takes no absolute paths
        (root / "kustomization.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        if config_text is not None:
            (root / CONFIG_KEY).write_text(config_text)
        return kustomize(root)
