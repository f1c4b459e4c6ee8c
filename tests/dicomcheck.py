"""dciodvfy as a test oracle: errors an output has that its input did not already have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .tools import require_tool

_NOISE = re.compile(r"(</?[^>]*>|\d+(\.\d+)*)")


def dciodvfy_errors(path: Path) -> set[str]:
    """The Error lines of dciodvfy for one file, with numbers and element paths folded so files compare."""
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return {_NOISE.sub("#", line.strip()) for line in lines if line.strip().startswith("Error")}


def new_errors(output: Path, source: Path) -> set[str]:
    return dciodvfy_errors(output) - dciodvfy_errors(source)
