"""Offline checks for the manifests under k8s/: rendering, CRD schemas, pod-security policy.

Kept apart from the tests so that each check can also be run against deliberately broken input
(a check that cannot fail proves nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("rayjob", "pytorchjob", "torchrun-job", "cpu-smoke")
K8S_VERSION = "1.32"  # the API version the manifests target (kubectl here is 1.32 too)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are megabytes of YAML


VENDORED_CRDS = Path(__file__).resolve().parent / "crds"  # byte-for-byte upstream copies (crds/README.md)


def crd_dir() -> Path:
    """The CRD schemas to validate against: ``SSGD_K8S_CRDS`` if set, else the vendored copies."""
    return Path(os.environ.get("SSGD_K8S_CRDS") or VENDORED_CRDS)


def render(overlay: str, kubectl: str | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize`` the overlay, exactly what ``kubectl apply -k`` would send."""
    kubectl = kubectl or shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH: it renders the kustomize overlays"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# --- CRD schemas ------------------------------------------------------------------------------


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema as the API server applies it, in JSON-Schema terms.

    Unknown fields are errors (the server would prune them, and `kubectl apply` rejects them) except
    under x-kubernetes-preserve-unknown-fields; a field with a default is not required, because
    the server fills it in before validating.
    """
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: strict_schema(sub) for name, sub in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
        if "required" in s:
            s["required"] = [r for r in s["required"] if "default" not in s["properties"].get(r, {})]
    if isinstance(s.get("items"), dict):
        s["items"] = strict_schema(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_schema(s["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict_schema(sub) for sub in s[key]]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


@cache
def _crd_schemas(directory: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict schema, for every version of every CRD file in the directory."""
    schemas = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def crd_errors(obj: dict[str, Any], directory: Path | None = None) -> list[str]:
    """Schema violations of a custom resource; raises KeyError if no CRD defines its kind."""
    import jsonschema

    schema = _crd_schemas(str(directory or crd_dir()))[(obj["apiVersion"], obj["kind"])]
    # openAPIV3 schemas are draft-4 JSON Schema plus x- extensions (which validators ignore).
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


# --- walking pod specs ------------------------------------------------------------------------


def pod_specs(obj: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec inside an object, wherever a kind nests it (Job, PyTorchJob, RayJob...)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            yield path, obj
            return
        for key, value in obj.items():
            yield from pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from pod_specs(value, f"{path}[{i}]")


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, {"spec": ...} template) for every pod spec, to validate as core PodTemplates."""
    for path, spec in pod_specs(obj):
        yield path, {"spec": spec}


def env_value(container: dict[str, Any], name: str) -> str | None:
    for var in container.get("env") or []:
        if var["name"] == name:
            return var.get("value")
    return None


def gpus(container: dict[str, Any]) -> int:
    return int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))


# --- policy -----------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|PRIVATE_?KEY|ACCESS_?KEY", re.I)


def image_problem(image: str) -> str | None:
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if digest:
        return None  # pinned by content
    if ":" not in last:
        return f"image {image!r} has no tag (means :latest)"
    if last.endswith(":latest"):
        return f"image {image!r} uses :latest"
    return None


def policy_violations(spec: dict[str, Any]) -> list[str]:
    """Why a pod spec would fail this project's policy (empty list: it passes)."""
    problems = []
    pod_sec = spec.get("securityContext") or {}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"pod sets {flag}")
    problems += [f"volume {n} is a hostPath" for n, v in volumes.items() if "hostPath" in v]
    for c in spec.get("initContainers", []) + spec["containers"]:
        where = f"container {c.get('name')}"
        sec = c.get("securityContext") or {}
        if not sec.get("runAsNonRoot", pod_sec.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot is not true")
        uid = sec.get("runAsUser", pod_sec.get("runAsUser"))
        if not isinstance(uid, int) or uid <= 0:
            problems.append(f"{where}: runAsUser {uid!r} is not a numeric non-root UID")
        if sec.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sec.get("privileged"):
            problems.append(f"{where}: privileged")
        if "ALL" not in ((sec.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts") or []}
        if sec.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        elif "emptyDir" not in mounts.get("/tmp", {}):
            problems.append(f"{where}: read-only root without an emptyDir at /tmp")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (res.get(kind) or {}):
                    problems.append(f"{where}: no {resource} {kind}")
        if gpus(c):
            requested = (res.get("requests") or {}).get("nvidia.com/gpu")
            if requested is not None and int(requested) != gpus(c):
                problems.append(f"{where}: GPU request != limit")
            if (mounts.get("/dev/shm", {}).get("emptyDir") or {}).get("medium") != "Memory":
                problems.append(f"{where}: GPU container without a Memory emptyDir at /dev/shm")
        if problem := image_problem(c.get("image", "")):
            problems.append(f"{where}: {problem}")
        for var in c.get("env") or []:
            if SECRET_NAME.search(var["name"]):
                if "value" in var or "secretKeyRef" not in (var.get("valueFrom") or {}):
                    problems.append(f"{where}: env {var['name']} must come from a secretKeyRef")
    return problems
