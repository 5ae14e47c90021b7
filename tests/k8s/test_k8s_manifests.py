"""Every overlay renders, validates offline against Kubernetes 1.32 and the operators' CRDs,
and is wired consistently (node counts, rendezvous address, token Secret, volumes)."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys

import k8s_checks as kc
import pytest
import yaml
from k8s_checks import OVERLAYS, env_value, gpus

from tests.conftest import INSTALL, require

CUSTOM_KINDS = {"RayJob", "RayCluster", "PyTorchJob"}


def kubernetes_validate():
    """The offline validator of core kinds (the ``k8s`` extra): skipped without it, an error under CI=true."""
    require(module="kubernetes_validate", install=INSTALL["k8s"])
    import kubernetes_validate

    return kubernetes_validate


def one(objs, kind):
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def main_container(spec):
    return spec["containers"][0]


# --- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(rendered, overlay):
    kinds = {o["kind"] for o in rendered[overlay]}
    assert {"ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert kinds & ({"Job"} | CUSTOM_KINDS), "no workload rendered"
    assert "Secret" not in kinds, "manifests must not ship Secrets (the user creates them)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strict(rendered, overlay):
    validator = kubernetes_validate()
    for obj in rendered[overlay]:
        if obj["kind"] in CUSTOM_KINDS:
            # Their pod templates are core PodTemplateSpecs: hold them to the core schema too.
            for _path, template in kc.pod_templates(obj):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                validator.validate(wrapped, kc.K8S_VERSION, strict=True)
        else:
            validator.validate(obj, kc.K8S_VERSION, strict=True)


def test_kubernetes_validate_cli(rendered, tmp_path):
    """The documented command line, on the files as rendered: no ERROR lines, exit status 0."""
    kubernetes_validate()
    files = []
    for overlay, objs in rendered.items():
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(objs))
        files.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", kc.K8S_VERSION, "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", ["rayjob", "pytorchjob"])
def test_custom_resources_match_crd_schemas(rendered, crds, overlay):
    custom = [o for o in rendered[overlay] if o["kind"] in CUSTOM_KINDS]
    assert custom
    for obj in custom:
        assert kc.crd_errors(obj, crds) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_vendored_crds_are_the_recorded_upstream_bytes():
    """tests/k8s/crds holds unmodified upstream files: each one's SHA-256 is the one its README records."""
    readme = (kc.VENDORED_CRDS / "README.md").read_text()
    recorded = dict(re.findall(r"^- `([^`]+\.yaml)` `([0-9a-f]{64})`", readme, re.M))
    files = sorted(p.name for p in kc.VENDORED_CRDS.glob("*.yaml"))
    assert files == sorted(recorded) == ["kubeflow.org_pytorchjobs.yaml", "ray.io_rayjobs.yaml"]
    for name, digest in recorded.items():
        assert hashlib.sha256((kc.VENDORED_CRDS / name).read_bytes()).hexdigest() == digest, name


def test_crd_check_rejects_unknown_field_and_wrong_type(rendered, crds):
    rayjob = one(rendered["rayjob"], "RayJob")
    unknown = copy.deepcopy(rayjob)
    unknown["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert any("imagee" in e for e in kc.crd_errors(unknown, crds))
    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in e for e in kc.crd_errors(wrong_type, crds))
    bad_enum = copy.deepcopy(rayjob)
    bad_enum["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert kc.crd_errors(bad_enum, crds)
    pytorchjob = one(rendered["pytorchjob"], "PyTorchJob")
    no_replicas = copy.deepcopy(pytorchjob)
    del no_replicas["spec"]["pytorchReplicaSpecs"]
    assert any("pytorchReplicaSpecs" in e for e in kc.crd_errors(no_replicas, crds))


def test_core_check_rejects_unknown_field_and_wrong_type(rendered):
    validator = kubernetes_validate()
    job = one(rendered["torchrun-job"], "Job")
    for mutate in (
        lambda j: j["spec"].__setitem__("completion", 2),  # unknown field
        lambda j: j["spec"].__setitem__("completions", "two"),  # wrong type
        lambda j: j["spec"]["template"]["spec"]["containers"][0].pop("name"),  # required field
    ):
        bad = copy.deepcopy(job)
        mutate(bad)
        with pytest.raises(validator.ValidationError):
            validator.validate(bad, kc.K8S_VERSION, strict=True)


# --- wiring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_volume_are_wired(rendered, overlay, tmp_path):
    objs = rendered[overlay]
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for obj in objs:
        for path, spec in kc.pod_specs(obj):
            for volume in spec.get("volumes") or []:
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, path
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, path
            if "submitter" in path:
                continue  # the Ray job submitter only talks to the head
            mounts = {m["mountPath"]: m["name"] for m in main_container(spec).get("volumeMounts") or []}
            assert "/etc/ssgd" in mounts and "/data" in mounts, path
    # The mounted config is one the package accepts (unknown keys and bad values are errors).
    config = tmp_path / "config.yaml"
    config.write_text(configmaps["ssgd-config"]["data"]["config.yaml"])
    from ssgd_dist.config import load_config

    load_config(str(config))


def arg(args, flag):
    """The value of ``--flag=V`` in a container's args (None if absent)."""
    return next((a.split("=", 1)[1] for a in args if a.startswith(flag + "=")), None)


@pytest.mark.parametrize("overlay", ["torchrun-job", "cpu-smoke"])
def test_indexed_job_rendezvous_and_retries(rendered, overlay):
    job, svc = one(rendered[overlay], "Job"), one(rendered[overlay], "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    c = main_container(pod)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env_value(c, "NNODES"))
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    # A lost pod is retried alone; the Job fails once one index has used its retries (a fixed group
    # cannot finish without it); evictions (drains, preemption) use none of them.
    assert pod["restartPolicy"] == "Never" and "backoffLimit" not in spec
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in spec[
        "podFailurePolicy"
    ]["rules"]
    # The c10d rendezvous on pod 0, at the port the Service and the container publish.
    args = c["args"]
    port = svc["spec"]["ports"][0]["port"]
    assert port == next(p["containerPort"] for p in c["ports"] if p["name"] == "rendezvous")
    assert arg(args, "--rdzv-backend") == "c10d"
    assert arg(args, "--rdzv-endpoint") == f"{job['metadata']['name']}-0.{svc['metadata']['name']}:{port}"
    assert arg(args, "--nnodes") == "$(NNODES)" and int(arg(args, "--max-restarts")) >= 1
    assert env_value(c, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1"  # or a replaced pod cannot rejoin
    assert int(env_value(c, "NPROC_PER_NODE")) == (gpus(c) or 1)
    if overlay == "cpu-smoke":
        assert gpus(c) == 0


def test_pytorchjob_is_elastic_and_its_torchrun_agrees_with_the_policy(rendered):
    job = one(rendered["pytorchjob"], "PyTorchJob")
    spec, policy = job["spec"], job["spec"]["elasticPolicy"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Worker"}, "elastic: every pod is a worker; worker 0 hosts the rendezvous"
    worker = replicas["Worker"]
    assert worker["restartPolicy"] == "OnFailure" and spec["runPolicy"]["backoffLimit"] >= 1
    assert 1 <= policy["minReplicas"] < policy["maxReplicas"] == worker["replicas"]
    c = main_container(worker["template"]["spec"])
    assert c["name"] == "pytorch"  # the operator finds its container by this name
    args = c["args"]
    assert arg(args, "--nnodes") == f"{policy['minReplicas']}:{policy['maxReplicas']}"
    assert arg(args, "--rdzv-backend") == policy["rdzvBackend"] == "c10d"
    assert int(arg(args, "--max-restarts")) == policy["maxRestarts"] >= 1
    assert int(arg(args, "--nproc-per-node")) == int(spec["nprocPerNode"]) == gpus(c)
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "pytorchjob-port")
    assert arg(args, "--rdzv-endpoint") == f"{job['metadata']['name']}-worker-0:{port}"
    assert env_value(c, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1"  # or a pod that comes back cannot rejoin


def test_rayjob_auth_size_and_lifecycle(rendered):
    job = one(rendered["rayjob"], "RayJob")
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["authOptions"]["mode"] == "token"
    secret = cluster["authOptions"]["secretName"]
    for path, pod in kc.pod_specs(job):
        c = main_container(pod)
        assert env_value(c, "RAY_AUTH_MODE") == "token", path
        token = next(v for v in c["env"] if v["name"] == "RAY_AUTH_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}, path
    workers = cluster["workerGroupSpecs"]
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Elastic: from the GPUs of every group's minReplicas pods to those of its maxReplicas pods.
    low, high = (
        sum(g[n] * gpus(main_container(g["template"]["spec"])) for g in workers) for n in ("minReplicas", "maxReplicas")
    )
    entry = spec["entrypoint"].split()
    assert "--use-gpu" in entry
    assert entry[entry.index("--num-workers") + 1] == f"{low}-{high}" and low < high
    storage = entry[entry.index("--storage-path") + 1]
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in workers]:
        mounts = [m["mountPath"] for m in main_container(pod)["volumeMounts"]]
        assert any(storage.startswith(m.rstrip("/") + "/") for m in mounts), "storage path not on a volume"


def test_rayjob_matches_the_image(rendered):
    """The entrypoint script and the Ray version are those the Dockerfile puts in the image."""
    dockerfile = (kc.K8S / "Dockerfile").read_text()
    cluster = one(rendered["rayjob"], "RayJob")["spec"]["rayClusterSpec"]
    assert re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M)[1] == cluster["rayVersion"]
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M)[1]
    script = one(rendered["rayjob"], "RayJob")["spec"]["entrypoint"].split()[1]
    assert script.startswith(workdir + "/")
    assert (kc.REPO / script[len(workdir) + 1 :]).is_file(), f"{script} is not in the repository"
