"""The install instructions say what is true: the torch pin, the CPU index used by the README and the gateway
image, and the GPU extra, all agree with pyproject.toml (issue 18, point 8)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# read as text: tomllib is 3.11+, and CineSR supports 3.10
def _torch_pin() -> str:
    (pin,) = re.findall(r'^\s*"torch==([^"]+)",', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return pin


def test_readme_installs_the_cpu_build_of_the_pinned_torch() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"pip install torch=={_torch_pin()} --index-url {CPU_INDEX}" in readme
    # CPU first, then the package
    assert readme.index(CPU_INDEX) < readme.index("pip install -e .\n")
    assert 'pip install -e ".[gpu]" --extra-index-url https://pypi.nvidia.com' in readme
    (gpu,) = re.findall(r"^gpu = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert {"onnxruntime-gpu", "tensorrt"} <= {re.split(r"[<>=]", d.strip(' "'))[0] for d in gpu.split(",")}


def test_pyproject_comment_does_not_claim_the_pin_avoids_cuda() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    comment = text[:text.index('"torch==')]
    comment = comment[comment.rindex("dependencies = ["):]
    assert "does not pick CPU or\n  # CUDA" in comment and CPU_INDEX in comment
    assert "an unpinned torch pulls" not in comment


def test_gateway_image_uses_the_same_pin_and_index() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile.gateway").read_text()
    assert f"ARG TORCH_VERSION={_torch_pin()}" in dockerfile
    assert f"--index-url {CPU_INDEX}" in dockerfile
