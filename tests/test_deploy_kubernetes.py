"""deploy/kubernetes: the core objects against Kubernetes' own schemas, the RayJob's fields.

* Secret, ServiceAccount, Role, RoleBinding, CronJob and the ConfigMap that kustomize
  generates are validated with ``kubernetes-validate`` (Kubernetes' OpenAPI schemas, shipped
  in the package, strict: unknown fields are errors), for the oldest and newest Kubernetes
  versions the manifests support.
* RayJob is KubeRay's CRD, whose schema no package here ships: the fields this setup relies
  on are checked by hand, and the head and worker pod templates are validated as
  Kubernetes ``PodTemplate`` objects. The entrypoint must parse with ``refseg label``'s own
  parser (nothing runs).
* ``start-rayjob.sh`` runs against a fake ``kubectl``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
from importlib.metadata import version
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from refseg.jobs.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
VERSIONS = ("1.27", "1.37")  # CronJob.spec.timeZone is GA from 1.27
# What a user edits, and nothing else (README: "What to edit")
PLACEHOLDERS = {"YOUR_ORG", "YOUR_BUCKET", "YOUR_ACCESS_KEY_ID", "YOUR_SECRET_ACCESS_KEY"}
LABEL = {"app.kubernetes.io/name": "refseg-label"}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _kustomization() -> dict:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def _generated_configmaps() -> list[dict]:
    """The ConfigMaps kustomize's configMapGenerator makes (no hash suffix, as configured)."""
    kust = _kustomization()
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True
    labels = kust["generatorOptions"].get("labels", {})
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "labels": labels},
            "data": {Path(f).name: (DEPLOY / f).read_text() for f in gen["files"]},
        }
        for gen in kust["configMapGenerator"]
    ]


def _objects() -> list[dict]:
    """Every object `kubectl apply -k deploy/kubernetes` creates."""
    objs = [d for name in _kustomization()["resources"] for d in _docs(name)]
    return objs + _generated_configmaps()


def _by_kind(kind: str) -> list[dict]:
    return [o for o in _objects() if o["kind"] == kind]


def _rayjob() -> dict:
    (job,) = _docs("rayjob.yaml")
    return job


@pytest.mark.parametrize("k8s", VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(k8s: str) -> None:
    objs = _objects()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "CronJob", "Role", "RoleBinding", "Secret", "ServiceAccount"]
    for obj in objs:
        kubernetes_validate.validate(obj, k8s, strict=True)  # raises on any error


def test_the_validator_rejects_a_broken_cronjob() -> None:
    (cron,) = _by_kind("CronJob")
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    broken = {**cron, "spec": {**cron["spec"], "concurrencyPolicy": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    typo = {**spec, "restartPolicyy": "Never"}
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**pod, "template": {"spec": typo}}, "1.37", strict=True)


def test_objects_refer_to_each_other_by_the_right_names() -> None:
    (cron,) = _by_kind("CronJob")
    (sa,) = _by_kind("ServiceAccount")
    (role,) = _by_kind("Role")
    (binding,) = _by_kind("RoleBinding")
    (cm,) = _by_kind("ConfigMap")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get", "list", "delete"} == set(rule["verbs"])
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    script, manifest = container["command"][1:]
    assert script == f"{mount}/start-rayjob.sh" and manifest == f"{mount}/rayjob.yaml"
    assert set(cm["data"]) == {"start-rayjob.sh", "rayjob.yaml"}
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod["restartPolicy"] == "Never"


def test_rayjob_fields_this_setup_relies_on() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"].endswith("-") and "name" not in job["metadata"]
    assert job["metadata"]["labels"] == LABEL  # start-rayjob.sh prunes old runs by it
    spec = job["spec"]
    # top-level RayJob spec fields of KubeRay >= 1.1 (ray.io/v1) used here
    assert set(spec) == {
        "entrypoint",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "rayClusterSpec",
    }
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    (cron,) = _by_kind("CronJob")
    job_deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert 0 < spec["activeDeadlineSeconds"] < job_deadline  # the watcher outlives the job
    cluster = spec["rayClusterSpec"]
    assert set(cluster) == {
        "rayVersion",
        "authOptions",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headGroupSpec",
        "workerGroupSpecs",
    }
    assert cluster["rayVersion"] == version("ray")  # the image's Ray is the pinned one
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for group in cluster["workerGroupSpecs"]:
        assert set(group) == {
            "groupName",
            "replicas",
            "minReplicas",
            "maxReplicas",
            "rayStartParams",
            "template",
        }
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # autoscaled from zero: GPU pods exist only while a job asks for GPUs
        assert group["minReplicas"] == 0 and group["replicas"] == 0
        assert group["maxReplicas"] >= 1
    (secret,) = _by_kind("Secret")
    for group in groups:
        template = group["template"]
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"}}
        for k8s in VERSIONS:
            kubernetes_validate.validate({**pod, "template": template}, k8s, strict=True)
        for container in template["spec"]["containers"]:
            assert container["image"] == "ghcr.io/YOUR_ORG/refseg:0.1.0"
            assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]


def test_rayjob_entrypoint_is_a_refseg_label_command_the_cli_accepts() -> None:
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["refseg", "label"]
    args = build_parser().parse_args(argv[1:])  # the real parser: exits on a bad flag
    assert args._command == "label"
    for uri in (args.memory, args.images, args.out, args.sam2_checkpoint, args.dinov2_checkpoint):
        assert uri.startswith("s3://YOUR_BUCKET/"), uri
    assert args.progress_interval == 60.0
    # KubeRay with Ray 2.60 gives a job no autoscaler config to read: the entrypoint says
    # how many GPUs the worker group can provide (tests/test_resource_plan.py: the policy)
    (group,) = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert args.device == "cuda" and args.max_gpus == group["maxReplicas"] * per_pod


def test_placeholders_are_the_only_edits() -> None:
    found: set[str] = set()
    for path in DEPLOY.iterdir():
        text = path.read_text()
        found |= set(re.findall(r"YOUR_[A-Z_]+", text))
        for line in text.splitlines() if path.suffix == ".yaml" else []:
            # in the manifests, the image and credential lines say so
            if re.search(r"YOUR_(ORG|ACCESS|SECRET)", line) and not line.lstrip().startswith("#"):
                assert "# EDIT" in line, f"{path.name}: {line}"
    assert found == PLACEHOLDERS
    readme = (DEPLOY / "README.md").read_text()
    assert all(p in readme for p in PLACEHOLDERS)


def test_ray_clusters_have_token_auth_and_no_public_dashboard() -> None:
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    # KubeRay >= 1.5.1: a random token per RayCluster, in a Secret, given to every Ray
    # container, the job submitter and the operator's own dashboard client
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    # a ClusterIP Service (the default), no Ingress: reached through kubectl port-forward
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    text = (DEPLOY / "rayjob.yaml").read_text()
    assert "RAY_AUTH_MODE" not in text and "RAY_AUTH_TOKEN" not in text  # no token in files
    assert "dashboard-host" not in text  # KubeRay's default: the pod network, not public
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl port-forward" in readme and "export RAY_AUTH_MODE=token" in readme
    assert "{.data.auth_token}" in readme  # where the token is read from


def test_gpu_workers_autoscale_with_the_job() -> None:
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"  # the autoscaler's GPU count for this group
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


# ------------------------------------------------------------------- start-rayjob.sh

_FAKE_KUBECTL = """#!/bin/sh
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  create) cat "$3" > "$FAKE_DIR/created"; echo rayjob.ray.io/refseg-label-abcde ;;
  get)
    case "$*" in
      *jobDeploymentStatus*)
        n=$(cat "$FAKE_DIR/polls" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_DIR/polls"
        if [ "$n" -ge 2 ]; then printf Complete; else printf Running; fi ;;
      *jobStatus*) printf "$FAKE_STATUS" ;;
      *) for i in 1 2 3 4 5 6 7; do echo rayjob.ray.io/refseg-label-old$i; done ;;
    esac ;;
  delete) ;;
esac
"""


@pytest.mark.parametrize(("status", "rc"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_start_script_waits_prunes_and_reports(tmp_path: Path, status: str, rc: int) -> None:
    sh = shutil.which("sh")
    assert sh
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    kubectl = bin_ / "kubectl"
    kubectl.write_text(_FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{bin_}:/usr/bin:/bin",
        "FAKE_DIR": str(tmp_path),
        "FAKE_STATUS": status,
        "KEEP_RAYJOBS": "5",
        "POLL_SECONDS": "0",
    }
    proc = subprocess.run(
        [sh, str(DEPLOY / "start-rayjob.sh"), str(DEPLOY / "rayjob.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == rc, proc.stderr
    assert f"deployment Complete, Ray job {status}" in proc.stdout
    assert (tmp_path / "created").read_text() == (DEPLOY / "rayjob.yaml").read_text()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"create -f {DEPLOY / 'rayjob.yaml'} -o name"
    assert sum("jobDeploymentStatus" in c for c in calls) == 3  # polled until Complete
    deleted = [c for c in calls if c.startswith("delete")]
    assert deleted == [f"delete rayjob.ray.io/refseg-label-old{i} --wait=false" for i in (1, 2)]
