"""The Helm chart renders to valid Kubernetes for the default and the GPU+KEDA+Ingress values, and
the rendered objects carry what an operator relies on: GPUs, probes, security, ports, secrets."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from deploy_helpers import (
    CHART,
    GPU_VALUES,
    KUBE_VERSION,
    Manifest,
    crd_validator,
    find,
    pod_specs,
    render,
    render_notes,
)

BUILTIN_GROUPS = {
    "v1",
    "apps",
    "policy",
    "networking.k8s.io",
    "autoscaling",
    "batch",
    "rbac.authorization.k8s.io",
}
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}


def validate_all(objects: list[Manifest], kube_version: str = KUBE_VERSION) -> list[str]:
    """Validate each object (strict: unknown fields are errors); returns 'Kind/name' of those checked."""
    checked = []
    for obj in objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else "v1"
        if obj["kind"] in CUSTOM_KINDS:
            # kubernetes-validate has no schemas for CRDs: use our own subset schemas instead.
            validator = crd_validator(obj)
            assert validator is not None, f"no schema under tests/deploy/schemas for {obj['kind']}"
            validator(obj)
        else:
            assert group in BUILTIN_GROUPS, f"unexpected API group {obj['apiVersion']} ({obj['kind']})"
            kubernetes_validate.validate(obj, kube_version, strict=True)
        checked.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return checked


# ---- rendering, lint, validation ----


# The oldest version Chart.yaml admits (kubeVersion >=1.27), the reference one, and the newest shipped.
KUBE_VERSIONS = ["1.27.0", KUBE_VERSION, kubernetes_validate.utils.latest_version()]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_default_values_render_to_valid_kubernetes(default_objects: list[Manifest], kube_version: str) -> None:
    checked = validate_all(default_objects, kube_version)
    kinds = {c.split("/")[0] for c in checked}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ServiceAccount",
    } <= kinds
    # Optional parts stay off by default.
    assert not kinds & {"Ingress", "ScaledObject", "ServiceMonitor"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_gpu_keda_ingress_values_render_to_valid_kubernetes(gpu_objects: list[Manifest], kube_version: str) -> None:
    checked = validate_all(gpu_objects, kube_version)
    kinds = {c.split("/")[0] for c in checked}
    assert {"Ingress", "ScaledObject", "TriggerAuthentication", "ServiceMonitor"} <= kinds
    # Both secrets come from existing Secrets: the chart must not create its own.
    assert "Secret" not in kinds


def test_strict_validation_catches_a_typo(default_objects: list[Manifest]) -> None:
    # Guard against a validator that accepts anything: a misspelled field must fail.
    deployment = copy.deepcopy(find(default_objects, "Deployment", "-gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_crd_schema_rejects_numeric_trigger_metadata(gpu_objects: list[Manifest]) -> None:
    scaled = copy.deepcopy(find(gpu_objects, "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 1  # KEDA wants strings
    validator = crd_validator(scaled)
    assert validator is not None
    with pytest.raises(jsonschema.ValidationError):
        validator(scaled)


@pytest.mark.parametrize("values_file", [None, GPU_VALUES], ids=["default", "gpu-keda-ingress"])
def test_helm_lint_passes_strict(values_file: Any) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace="imaging", kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [], report
    # Strict: warnings count as failures too; info-level hints are allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


# ---- values schema ----


def test_schema_rejects_bad_values() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})  # the defaults pass
        for bad in (
            {"gateway": {"replicas": "two"}},
            {"worker": {"gpu": {"count": 0}}},
            {"config": {"backend": "cuda"}},
            {"config": {"aeTitle": "A_TITLE_LONGER_THAN_16"}},
            {"gatway": {"replicas": 2}},  # typo in a top-level key
            {"redis": {"auth": {"password": "p@ss/word"}}},  # would break the broker URL
            {"config": {"steps": 3}},  # not a step count a bundle serves
            {"config": {"uncertaintyDraws": 1}},  # a standard deviation needs two draws
            {"config": {"uncertaintyDraws": 33}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)
    report = helm.lint(CHART, {"gateway": {"replicas": "two"}})
    assert any("replicas" in e for e in report["errors"])


def test_steps_and_uncertainty_reach_the_settings() -> None:
    """config.steps / config.uncertaintyDraws become CINESR_STEPS / CINESR_UNCERTAINTY_DRAWS (steps only when
    set: unset means the bundle's choice), and Settings reads them back."""
    from cinesr.service.settings import Settings

    default = find(render(), "ConfigMap")["data"]
    assert "CINESR_STEPS" not in default and default["CINESR_UNCERTAINTY_DRAWS"] == "0"
    data = find(render({"config": {"steps": 4, "uncertaintyDraws": 6}}), "ConfigMap")["data"]
    assert data["CINESR_STEPS"] == "4" and data["CINESR_UNCERTAINTY_DRAWS"] == "6"
    settings = Settings(steps=data["CINESR_STEPS"], uncertainty_draws=data["CINESR_UNCERTAINTY_DRAWS"])
    assert (settings.steps, settings.uncertainty_draws) == (4, 6)


def test_grace_period_must_exceed_task_time_limit() -> None:
    with pytest.raises(helm.HelmRenderError, match="must exceed config.taskTimeLimit"):
        render({"config": {"taskTimeLimit": 3000}, "worker": {"terminationGracePeriodSeconds": 2500}})


# ---- workers and GPUs ----


def test_worker_requests_one_gpu_on_gpu_nodes(gpu_objects: list[Manifest], gpu_values: dict[str, Any]) -> None:
    worker = find(gpu_objects, "Deployment", "-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "32Gi"  # user limits merged, not replaced
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    assert container["args"] == ["worker"]
    # KEDA owns the replica count: a fixed one would fight the autoscaler on every upgrade.
    assert "replicas" not in worker["spec"]
    # The gateway does not land on (or take) GPUs.
    gateway = find(gpu_objects, "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in gateway["containers"][0]["resources"].get("limits", {})


def test_cpu_only_workers_request_no_gpu() -> None:
    objects = render({"worker": {"gpu": {"enabled": False}}, "config": {"backend": "onnx"}})
    container = find(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert find(objects, "ConfigMap")["data"]["CINESR_BACKEND"] == "onnx"


def test_termination_grace_exceeds_task_hard_limit(default_objects: list[Manifest]) -> None:
    limit = int(find(default_objects, "ConfigMap")["data"]["CINESR_TASK_TIME_LIMIT"])
    soft = int(find(default_objects, "ConfigMap")["data"]["CINESR_TASK_SOFT_TIME_LIMIT"])
    assert soft < limit
    grace = find(default_objects, "Deployment", "-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > limit


def test_worker_startup_probe_allows_engine_builds(default_objects: list[Manifest]) -> None:
    container = find(default_objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]
    assert startup["exec"]["command"] == ["cinesr", "probe", "worker"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert container["readinessProbe"]["exec"]["command"] == ["cinesr", "probe", "worker"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # Engines survive restarts on the shared volume; the heartbeat file lives on the writable /tmp.
    assert mounts["/var/cache/cinesr/engines"]["name"] == "data"
    assert mounts["/var/cache/cinesr/engines"]["subPath"] == "engine-cache"
    env = find(default_objects, "ConfigMap")["data"]
    assert env["CINESR_ENGINE_CACHE"] == "/var/cache/cinesr/engines"
    assert env["CINESR_HEARTBEAT_FILE"].startswith("/tmp/")


def test_keda_scales_workers_on_the_celery_list(gpu_objects: list[Manifest]) -> None:
    scaled = find(gpu_objects, "ScaledObject")
    worker = find(gpu_objects, "Deployment", "-worker")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == "celery"
    assert trigger["metadata"]["listLength"] == "1"
    redis_service = find(gpu_objects, "Service", "-redis")["metadata"]["name"]
    # Resolvable from KEDA's namespace, not only from ours.
    assert trigger["metadata"]["address"] == f"{redis_service}.imaging.svc:6379"
    auth = find(gpu_objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "cinesr-redis", "key": "password"}]


# ---- gateway, services, ingress, monitoring ----


def test_dicom_service_maps_104_to_the_listener(default_objects: list[Manifest]) -> None:
    service = find(default_objects, "Service", "-dicom")
    assert service["spec"]["type"] == "LoadBalancer"
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["protocol"]) == (104, 11112, "TCP")
    assert service["spec"]["loadBalancerSourceRanges"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"
    gateway = find(default_objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "dicom", "containerPort": 11112, "protocol": "TCP"} in gateway["ports"]
    rest = find(default_objects, "Service", "-gateway")
    assert rest["spec"]["type"] == "ClusterIP"
    assert rest["spec"]["ports"][0]["targetPort"] == "http"


def test_source_ranges_from_values(gpu_objects: list[Manifest]) -> None:
    service = find(gpu_objects, "Service", "-dicom")
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.20.0.0/16"]
    assert service["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-internal"] == "true"


def test_gateway_probes(default_objects: list[Manifest]) -> None:
    container = find(default_objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["exec"]["command"] == ["cinesr", "probe", "dicom"]


def test_every_container_has_all_three_probes(default_objects: list[Manifest], gpu_objects: list[Manifest]) -> None:
    for objects in (default_objects, gpu_objects):
        for name, pod in pod_specs(objects):
            for container in pod["containers"]:
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    assert probe in container, f"{name}/{container['name']} lacks {probe}"


def test_ingress_and_service_monitor_target_the_rest_service(gpu_objects: list[Manifest]) -> None:
    rest = find(gpu_objects, "Service", "-gateway")
    ingress = find(gpu_objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "cinesr-tls", "hosts": ["cinesr.hospital.internal"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": rest["metadata"]["name"], "port": {"name": "http"}}
    monitor = find(gpu_objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The selector picks the REST Service only (the DICOM Service has no http port).
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in gpu_objects if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == [rest["metadata"]["name"]]


def test_pod_disruption_budgets_cover_gateway_and_workers(default_objects: list[Manifest]) -> None:
    for component in ("gateway", "worker"):
        pdb = find(default_objects, "PodDisruptionBudget", f"-{component}")
        workload = find(default_objects, "Deployment", f"-{component}")
        assert pdb["spec"]["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_standard_labels_on_every_object(default_objects: list[Manifest], gpu_objects: list[Manifest]) -> None:
    for obj in default_objects + gpu_objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "cinesr"
        assert labels["app.kubernetes.io/instance"] == "cinesr"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("cinesr-")


# ---- security ----


def test_every_container_runs_locked_down(default_objects: list[Manifest], gpu_objects: list[Manifest]) -> None:
    for objects in (default_objects, gpu_objects):
        for name, pod in pod_specs(objects):
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert pod["automountServiceAccountToken"] is False, name
            volumes = {v["name"]: v for v in pod["volumes"]}
            # Pod Security Standard "restricted": no host namespaces, only these volume types.
            assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
            for volume in volumes.values():
                kinds = set(volume) - {"name"}
                assert kinds <= {"persistentVolumeClaim", "emptyDir", "configMap", "secret", "projected"}, name
            for container in pod["containers"] + pod.get("initContainers", []):
                ctx = container["securityContext"]
                where = f"{name}/{container['name']}"
                assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0, where
                assert ctx["readOnlyRootFilesystem"] is True, where
                assert ctx["allowPrivilegeEscalation"] is False, where
                assert ctx["capabilities"] == {"drop": ["ALL"]}, where
                assert not ctx.get("privileged", False), where
                assert all("hostPort" not in port for port in container.get("ports", [])), where
                # A read-only root needs a writable /tmp.
                tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], where


SECRET_TOKEN = "tok-7c4a1f0e9b2d4c6a8e1f"
SECRET_PASSWORD = "redisPw-91d3b7e2f0a4"


def test_secrets_never_leave_the_secret() -> None:
    objects = render(
        {
            "apiTokens": {"tokens": [SECRET_TOKEN, SECRET_TOKEN + "b"]},
            "redis": {"auth": {"password": SECRET_PASSWORD}},
        }
    )
    secret = find(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"api-tokens": f"{SECRET_TOKEN},{SECRET_TOKEN}b", "redis-password": SECRET_PASSWORD}
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        for value in (SECRET_TOKEN, SECRET_PASSWORD):
            assert value not in text, f"{value!r} leaked into {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "ConfigMap":
            assert not any("TOKEN" in key or "PASSWORD" in key or "BROKER" in key for key in obj["data"])


def test_broker_url_is_assembled_in_the_pod(default_objects: list[Manifest]) -> None:
    redis_service = find(default_objects, "Service", "-redis")["metadata"]["name"]
    for component in ("gateway", "worker"):
        container = find(default_objects, "Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"][0]
        env = [e["name"] for e in container["env"]]
        by_name = {e["name"]: e for e in container["env"]}
        # $(VAR) expansion only sees variables defined earlier in the list.
        assert env.index("CINESR_REDIS_PASSWORD") < env.index("CINESR_BROKER_URL")
        assert by_name["CINESR_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
        assert by_name["CINESR_BROKER_URL"]["value"] == f"redis://:$(CINESR_REDIS_PASSWORD)@{redis_service}:6379/0"
    gateway = find(default_objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    tokens = {e["name"]: e for e in gateway["env"]}["CINESR_API_TOKENS"]
    assert tokens["valueFrom"]["secretKeyRef"]["key"] == "api-tokens"


def test_existing_secrets_are_referenced(gpu_objects: list[Manifest]) -> None:
    gateway = find(gpu_objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["CINESR_API_TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "cinesr-api-tokens",
        "key": "tokens",
    }
    assert env["CINESR_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "cinesr-redis",
        "key": "password",
    }
    redis = find(gpu_objects, "StatefulSet", "-redis")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "cinesr-redis", "key": "password"} in [
        e["valueFrom"]["secretKeyRef"] for e in redis["env"] if "valueFrom" in e
    ]


def test_generated_secrets_when_none_given(default_objects: list[Manifest]) -> None:
    data = {k: base64.b64decode(v).decode() for k, v in find(default_objects, "Secret")["data"].items()}
    assert len(data["api-tokens"]) == 40 and data["api-tokens"].isalnum()
    assert len(data["redis-password"]) == 32 and data["redis-password"].isalnum()


def test_external_redis_without_chart_redis() -> None:
    objects = render(
        {
            "redis": {
                "enabled": False,
                "external": {"host": "redis.shared.svc", "port": 6380, "tls": True},
                "auth": {"existingSecret": "shared-redis"},
            }
        }
    )
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    worker = find(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    url = {e["name"]: e for e in worker["env"]}["CINESR_BROKER_URL"]["value"]
    assert url == "rediss://:$(CINESR_REDIS_PASSWORD)@redis.shared.svc:6380/0"
    validate_all(objects)


# ---- redis and data ----


def test_redis_persists_its_queue(default_objects: list[Manifest]) -> None:
    redis = find(default_objects, "StatefulSet", "-redis")
    script = redis["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    assert "$REDIS_PASSWORD" in script and "requirepass" in script
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "redis-data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_shared_data_volume(default_objects: list[Manifest]) -> None:
    pvc = find(default_objects, "PersistentVolumeClaim", "-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in ("gateway", "worker"):
        pod = find(default_objects, "Deployment", f"-{component}")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert {"name": "data", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]
    assert find(default_objects, "ConfigMap")["data"]["CINESR_DATA_DIR"] == "/data"


def test_existing_claim_and_model_volume(gpu_objects: list[Manifest]) -> None:
    objects = render({"persistence": {"existingClaim": "hospital-cinesr"}})
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    pod = find(objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "hospital-cinesr"
    # GPU values mount the model bundle claim read-only and point MODEL_DIR at it.
    pod = find(gpu_objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["model"] == {
        "name": "model",
        "mountPath": "/models",
        "readOnly": True,
        "subPath": "base-v1",
    }
    assert find(gpu_objects, "ConfigMap")["data"]["CINESR_MODEL_DIR"] == "/models"


def test_notes_tell_the_operator_where_to_point_pacs(gpu_values: dict[str, Any]) -> None:
    notes = render_notes(gpu_values)
    assert 'AE title "CINESR", port 104' in notes
    assert "10.20.0.0/16" in notes
    assert "https://cinesr.hospital.internal/docs" in notes
    assert "scaled by KEDA between 1 and 8 pods" in notes
    assert "WARNING" in render_notes()  # default: any calling AE is accepted


def test_rendered_manifests_pass_the_kubernetes_validate_cli(tmp_path: Any, gpu_objects: list[Manifest]) -> None:
    # The same check an operator can run by hand: kubernetes-validate --strict on a file.
    builtin = [o for o in gpu_objects if o["kind"] not in CUSTOM_KINDS]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBE_VERSION,
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_cinesr_pods_and_keda_reach_redis(default_objects: list[Manifest], gpu_objects: list[Manifest]) -> None:
    policy = find(default_objects, "NetworkPolicy", "-redis")
    redis = find(default_objects, "StatefulSet", "-redis")
    assert policy["spec"]["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = {e["key"]: e["values"] for e in peer["podSelector"]["matchExpressions"]}
    assert allowed == {"app.kubernetes.io/instance": ["cinesr"], "app.kubernetes.io/component": ["gateway", "worker"]}
    # Every pod that needs the broker matches the rule.
    for component in ("gateway", "worker"):
        labels = find(default_objects, "Deployment", f"-{component}")["spec"]["template"]["metadata"]["labels"]
        assert all(labels[key] in values for key, values in allowed.items())
    # With KEDA on, its operator namespace may read the queue length too.
    keda_rule = find(gpu_objects, "NetworkPolicy", "-redis")["spec"]["ingress"][0]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in keda_rule["from"]


VARIANTS = {
    "no-workers": {"worker": {"enabled": False}},
    "external-redis-no-auth": {"redis": {"enabled": False, "auth": {"enabled": False}, "external": {"host": "r.svc"}}},
    "engine-cache-emptydir": {"worker": {"engineCache": {"useDataVolume": False}}},
    "engine-cache-claim": {"worker": {"engineCache": {"existingClaim": "engines"}}},
    "dicom-clusterip": {"gateway": {"dicomService": {"type": "ClusterIP"}}},
    "keda-scale-to-zero": {"keda": {"enabled": True, "minReplicaCount": 0}, "redis": {"auth": {"enabled": False}}},
    "digests": {"gateway": {"image": {"digest": "sha256:" + "a" * 64}}, "config": {"extra": {"max_windows": 64}}},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_value_variants_render_valid(name: str) -> None:
    objects = render(VARIANTS[name])
    validate_all(objects)
    workers = [o for o in objects if o["metadata"]["name"].endswith("-worker")]
    pods = dict(pod_specs(objects))
    if name == "no-workers":
        assert workers == []
    elif name == "external-redis-no-auth":
        env = {e["name"]: e for e in pods["cinesr-worker"]["containers"][0]["env"]}
        assert env["CINESR_BROKER_URL"] == {"name": "CINESR_BROKER_URL", "value": "redis://r.svc:6379/0"}
        assert "CINESR_REDIS_PASSWORD" not in env
        secret = find(objects, "Secret")
        assert set(secret["data"]) == {"api-tokens"}
        assert not [o for o in objects if o["kind"] == "NetworkPolicy"]
    elif name.startswith("engine-cache"):
        volumes = {v["name"]: v for v in pods["cinesr-worker"]["volumes"]}
        expected = "emptyDir" if name.endswith("emptydir") else "persistentVolumeClaim"
        assert expected in volumes["engine-cache"]
    elif name == "dicom-clusterip":
        spec = find(objects, "Service", "-dicom")["spec"]
        assert spec["type"] == "ClusterIP" and "loadBalancerSourceRanges" not in spec
        assert "externalTrafficPolicy" not in spec
    elif name == "keda-scale-to-zero":
        scaled = find(objects, "ScaledObject")
        assert scaled["spec"]["minReplicaCount"] == 0
        assert "authenticationRef" not in scaled["spec"]["triggers"][0]
        assert not [o for o in objects if o["kind"] == "TriggerAuthentication"]
    elif name == "digests":
        image = pods["cinesr-gateway"]["containers"][0]["image"]
        assert image == "ghcr.io/cinesr/cinesr-gateway@sha256:" + "a" * 64
        assert find(objects, "ConfigMap")["data"]["CINESR_MAX_WINDOWS"] == "64"


def test_service_settings_accept_the_configmap(gpu_objects: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings the pods get are ones the real Settings class parses, with the intended values.
    from cinesr.service.settings import Settings

    data = find(gpu_objects, "ConfigMap")["data"]
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.ae_title == "CINESR"
    assert (settings.dicom_port, settings.http_port) == (11112, 8000)
    assert str(settings.data_dir) == "/data"
    assert settings.allowed_calling_aets == ["PACS01", "MRSCANNER1", "CINESR-PROBE"]  # the probe's AE added
    assert (settings.pacs_ae_title, settings.pacs_host, settings.pacs_port) == ("PACS01", "pacs.hospital.internal", 104)
    assert settings.auto_process is True and settings.series_stable_seconds == 10
    assert str(settings.model_dir) == "/models" and settings.backend == "tensorrt"


def test_service_settings_accept_the_default_configmap(
    default_objects: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cinesr.service.settings import Settings

    for name, value in find(default_objects, "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.allowed_calling_aets == [] and not settings.pacs_configured
    assert settings.model_dir is None and settings.backend == "auto"
    # issue 14: the listener's memory limits and the journal's sizes, as the chart's defaults set them
    assert (settings.max_pdu_size, settings.receive_buffer_bytes) == (1 << 20, 256 << 20)
    assert (settings.journal_segment_bytes, settings.journal_spare_segments) == (8 << 20, 2)


def test_dicomweb_pacs_settings_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # The PACS by URL and DICOMweb destinations in the ConfigMap; their credentials only in the Secret, reaching
    # both the gateway (QIDO-RS/WADO-RS pulls) and the workers (STOW-RS exports); the real Settings parse them.
    from cinesr.service.settings import Settings
    from cinesr.worker.network.dicomweb import DicomWebNode
    from cinesr.worker.network.pacs import destination_node, pacs_node

    password, credentials = "dwPw-7c41e2", "CLOUD=bearer:dwTok-90ab1f"
    objects = render({"config": {"pacs": {"aeTitle": "PACS01", "dicomwebUrl": "https://pacs.internal/dicom-web"},
                                 "destinations": ["ARCHIVE@archive.internal:104", "CLOUD=https://cloud.example/dw"]},
                      "dicomwebAuth": {"username": "cinesr", "password": password,
                                       "destinationCredentials": credentials}})
    validate_all(objects)
    secret = find(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert (data["dicomweb-username"], data["dicomweb-password"]) == ("cinesr", password)
    assert data["dicomweb-destination-credentials"] == credentials and "dicomweb-token" not in data
    for obj in objects:
        if obj["kind"] != "Secret":
            assert password not in json.dumps(obj) and "dwTok-90ab1f" not in json.dumps(obj), obj["kind"]
    config = find(objects, "ConfigMap")["data"]
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    for component in ("gateway", "worker"):
        container = find(objects, "Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "DICOMWEB" in e["name"]}
        assert refs == {"CINESR_PACS_DICOMWEB_USER": {"name": secret["metadata"]["name"], "key": "dicomweb-username"},
                        "CINESR_PACS_DICOMWEB_PASSWORD": {"name": secret["metadata"]["name"],
                                                          "key": "dicomweb-password"},
                        "CINESR_DICOMWEB_CREDENTIALS": {"name": secret["metadata"]["name"],
                                                        "key": "dicomweb-destination-credentials"}}
        for name, ref in refs.items():  # what the kubelet would put there
            monkeypatch.setenv(name, data[ref["key"]])
        settings = Settings()
        pacs = pacs_node(settings)
        assert isinstance(pacs, DicomWebNode) and pacs.url == "https://pacs.internal/dicom-web"
        assert (pacs.name, pacs.user, pacs.password) == ("PACS01", "cinesr", password)
        cloud = destination_node(settings, "CLOUD")
        assert isinstance(cloud, DicomWebNode) and cloud.token == "dwTok-90ab1f"
        assert destination_node(settings, "ARCHIVE").ae_title == "ARCHIVE"
    # a Secret of the operator's instead: referenced, every key optional, nothing of ours rendered
    objects = render({"dicomwebAuth": {"existingSecret": "pacs-credentials", "tokenKey": "bearer"}})
    gateway = find(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway["env"] if "DICOMWEB" in e["name"]}
    assert refs["CINESR_PACS_DICOMWEB_TOKEN"] == {"name": "pacs-credentials", "key": "bearer", "optional": True}
    assert len(refs) == 4 and all(r["name"] == "pacs-credentials" and r["optional"] for r in refs.values())
    assert not any(k.startswith("dicomweb") for k in find(objects, "Secret")["data"])
    with pytest.raises(Exception, match="dicomwebUrl|pattern"):
        render({"config": {"pacs": {"dicomwebUrl": "https://user:pw@pacs/dicom-web"}}})


def test_routing_limits_reach_the_service_settings(default_objects: list[Manifest]) -> None:
    """config.routing.* become the ROUTING_* settings, with the service's defaults; the schema checks them."""
    from cinesr.service.settings import Settings

    data = find(default_objects, "ConfigMap")["data"]
    settings = Settings(**{k.removeprefix("CINESR_").lower(): v for k, v in data.items()
                           if k.startswith("CINESR_ROUTING_")})
    defaults = Settings()
    assert settings.routing_max_matrix == defaults.routing_max_matrix == 192
    assert (settings.routing_max_frames, settings.routing_max_slices) == (defaults.routing_max_frames,
                                                                          defaults.routing_max_slices)
    assert data["CINESR_ROUTING_INCLUDE_PATTERN"] == data["CINESR_ROUTING_EXCLUDE_PATTERN"] == ""
    custom = render({"config": {"routing": {"maxMatrix": 128, "excludePattern": "(?i)localizer"}}})
    assert find(custom, "ConfigMap")["data"]["CINESR_ROUTING_MAX_MATRIX"] == "128"
    assert find(custom, "ConfigMap")["data"]["CINESR_ROUTING_EXCLUDE_PATTERN"] == "(?i)localizer"
