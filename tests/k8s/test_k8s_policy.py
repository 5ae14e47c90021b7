"""Security and resource policy over every rendered pod, and over the image's Dockerfile."""

from __future__ import annotations

import copy
import re

import k8s_checks as kc
import pytest
from k8s_checks import OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_policy(rendered, overlay):
    problems = [
        f"{obj['kind']}/{obj['metadata']['name']} {path}: {p}"
        for obj in rendered[overlay]
        for path, spec in kc.pod_specs(obj)
        for p in kc.policy_violations(spec)
    ]
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_plaintext_secrets_anywhere(rendered, overlay):
    """No Secret objects, and no token-like env var carries a literal value in any object."""

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and kc.SECRET_NAME.search(str(node["name"])) and "value" in node:
                yield node["name"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    assert [o for o in rendered[overlay] if o["kind"] == "Secret"] == []
    assert [name for obj in rendered[overlay] for name in walk(obj)] == []


def test_policy_check_catches_violations(rendered):
    """Break a compliant pod in each way the policy forbids; each break must be reported."""
    job = next(o for o in rendered["torchrun-job"] if o["kind"] == "Job")
    good = job["spec"]["template"]["spec"]
    assert kc.policy_violations(good) == []
    breaks = {
        "runAsNonRoot": lambda s, c: (
            s["securityContext"].pop("runAsNonRoot"),
            c["securityContext"].pop("runAsNonRoot"),
        ),
        "runAsUser": lambda s, c: (
            s["securityContext"].__setitem__("runAsUser", 0),
            c["securityContext"].pop("runAsUser"),
        ),
        "allowPrivilegeEscalation": lambda s, c: c["securityContext"].pop("allowPrivilegeEscalation"),
        "drop ALL": lambda s, c: c["securityContext"]["capabilities"].__setitem__("drop", ["NET_RAW"]),
        "writable": lambda s, c: c["securityContext"].__setitem__("readOnlyRootFilesystem", False),
        "no cpu limits": lambda s, c: c["resources"]["limits"].pop("cpu"),
        "no memory requests": lambda s, c: c["resources"].pop("requests"),
        ":latest": lambda s, c: c.__setitem__("image", "ssgd-dist:latest"),
        "no tag": lambda s, c: c.__setitem__("image", "registry.example.com:5000/ssgd-dist"),
        "secretKeyRef": lambda s, c: c["env"].append({"name": "RAY_AUTH_TOKEN", "value": "abc"}),
        "/dev/shm": lambda s, c: s["volumes"].__setitem__(
            next(i for i, v in enumerate(s["volumes"]) if v["name"] == "dshm"), {"name": "dshm", "emptyDir": {}}
        ),
        "hostNetwork": lambda s, c: s.__setitem__("hostNetwork", True),
    }
    for what, mutate in breaks.items():
        bad = copy.deepcopy(good)
        mutate(bad, bad["containers"][0])
        assert kc.policy_violations(bad), f"policy missed: {what}"


# --- the image ---------------------------------------------------------------------------------

DOCKERFILE = kc.K8S / "Dockerfile"


def test_dockerfile_pins_base_and_runs_as_numeric_non_root():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)[1]
    assert kc.image_problem(base) is None and "cuda" in base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root UID"
    assert re.search(r'pip install "?\.\[ray,deepspeed\]"?', text)


def test_dockerfile_bakes_in_no_secrets():
    text = DOCKERFILE.read_text()
    for line in re.findall(r"^(?:ENV|ARG)\s.*$", text, re.M):
        assert not kc.SECRET_NAME.search(line), line
    ignore = (kc.K8S / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".env", "**/auth_token"} <= set(ignore)
