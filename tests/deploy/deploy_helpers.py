"""Helpers for the deployment tests: render the Helm chart offline and validate manifests.

No helm binary, cluster or Docker engine is involved: helm-python-sdk embeds Helm's Go library,
kubernetes-validate ships the Kubernetes JSON schemas.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "cinesr"
GPU_VALUES = CHART / "ci" / "gpu-keda-ingress-values.yaml"
DOCKER = REPO / "docker"
CRD_SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The Kubernetes version manifests are validated against (kubernetes-validate ships its schemas).
KUBE_VERSION = "1.30.0"
RELEASE = "cinesr"
NAMESPACE = "imaging"


Manifest = dict[str, Any]


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every object the chart renders for `values`, in template order (NOTES.txt excluded)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Manifest] = []
    for path in sorted(rendered):
        if not path.endswith(".yaml"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return objects


def render_notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def find(objects: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    """The one object of `kind` whose name ends with `name_suffix`."""
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def pod_specs(objects: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) for every Deployment and StatefulSet."""
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def crd_validator(obj: Manifest) -> Callable[[Manifest], None] | None:
    """A validator from our own small schema for a custom resource, or None when we ship none."""
    group = obj["apiVersion"].split("/")[0].split(".")[0]
    version = obj["apiVersion"].split("/")[-1]
    path = CRD_SCHEMAS / f"{obj['kind'].lower()}-{group}-{version}.json"
    if not path.exists():
        return None
    import jsonschema

    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema).validate
