"""Where and on what code a measurement was taken: the machine, library versions and the git commit.

Every record in bench/results (engines, ingest, demo, demo seeds) carries these, so that a number can be
traced to its hardware, its load at the time and the code that produced it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict[str, Any]:
    """CPU, cores, load (a busy machine explains slow stages), Python, thread settings, GPU if torch sees one."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    gpu = None
    torch = sys.modules.get("torch")  # only asked when already loaded: a record must not pull torch in
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1_5_15_min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "hostname_hash": str(abs(hash(platform.node())) % 10**8),
        "gpu": gpu,
    }


def versions(modules: tuple[str, ...] = ("torch", "numpy", "onnxruntime", "onnx", "tensorrt", "cv2",
                                         "pydicom", "pynetdicom")) -> dict[str, str | None]:
    """Versions of the libraries that decide the speed (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except Exception:  # absent, or broken in a way that does not matter for a record
            out[name] = None
    return out


def git_commit(short: bool = False) -> str | None:
    """The checkout's commit, with "-dirty" when the code (model/, worker/, service/, bench/) has uncommitted
    changes; None for an installed package without a checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", *(["--short"] if short else []), "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "model", "worker",
                                "service", "bench"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None
