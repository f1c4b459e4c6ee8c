"""Image quality metrics used by evaluation and training: PSNR, SSIM and LPIPS.

* ``psnr`` and ``ssim`` take images in [0, 1] (numpy arrays or torch tensors) whose last two
  dimensions are spatial; leading dimensions (frames, channels) are averaged, like
  ``skimage.metrics`` does for multichannel images.
* ``ssim`` is the Gaussian-window SSIM of Wang et al. (2004): 11x11 window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, population covariances, mean over the map without the 5-pixel border.
  This is what ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` computes.
* ``lpips`` is LPIPS v0.1 with the AlexNet backbone (Zhang et al., CVPR 2018), implemented here in
  plain torch. Weights are vendored in ``weights/lpips_alex.safetensors`` (see
  ``weights/README.md``); nothing is downloaded or unpickled at run time.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

__all__ = ["LPIPS", "lpips", "psnr", "ssim", "LPIPS_WEIGHTS"]

LPIPS_WEIGHTS = Path(__file__).resolve().parent / "weights" / "lpips_alex.safetensors"

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    return x.detach().to(torch.float64)


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; ``inf`` for identical inputs."""
    ta, tb = _as_float64(a), _as_float64(b)
    if ta.shape != tb.shape:
        raise ValueError(f"shape mismatch: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    mse = torch.mean((ta - tb) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _numpy64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return np.asarray(x, dtype=np.float64)
    return x.detach().to(torch.float64).cpu().numpy()


def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a: ArrayLike, b: ArrayLike, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Mean SSIM with an 11x11 Gaussian window (sigma 1.5) of images shaped (..., H, W).

    Leading dimensions are treated as separate images and the result is their mean SSIM.
    """
    from scipy.ndimage import correlate1d

    ta, tb = _numpy64(a), _numpy64(b)  # scipy's filters work on numpy: no round trip through torch
    if ta.shape != tb.shape:
        raise ValueError(f"shape mismatch: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.ndim < 2:
        raise ValueError("ssim needs images with at least two (spatial) dimensions")
    radius = int(3.5 * sigma + 0.5)  # skimage's truncate=3.5 -> 11 taps for sigma 1.5
    h, w = ta.shape[-2:]
    if h <= 2 * radius or w <= 2 * radius:
        raise ValueError(f"images must be larger than {2 * radius + 1}x{2 * radius + 1}")
    x = ta.reshape(-1, h, w)
    y = tb.reshape(-1, h, w)
    g = _gaussian_taps(sigma, radius)

    # Only the pixels at least `radius` away from the border enter the mean (as in skimage); their windows lie
    # inside the image, so the border mode never matters and cropping gives exactly those values. scipy's
    # separable float64 filter is ~4x faster on a CPU than torch's float64 convolution.
    def blur(t: np.ndarray) -> np.ndarray:
        return correlate1d(correlate1d(t, g, axis=1), g, axis=2)[:, radius:-radius, radius:-radius]

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s_map.mean(axis=(1, 2)).mean())


# ----------------------------------------------------------------------------------------- LPIPS

# ScalingLayer of LPIPS: maps [-1, 1] inputs to the ImageNet normalisation AlexNet was trained with.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# (out, in, kernel, stride, padding) of AlexNet's five convolutions; torchvision `features.<i>` names.
_CONVS = {
    "0": (64, 3, 11, 4, 2),
    "3": (192, 64, 5, 1, 2),
    "6": (384, 192, 3, 1, 1),
    "8": (256, 384, 3, 1, 1),
    "10": (256, 256, 3, 1, 1),
}


class _AlexNetFeatures(nn.Module):
    """AlexNet's convolutional trunk returning the five ReLU outputs LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleDict(
            {
                name: nn.Conv2d(cin, cout, k, stride=s, padding=p)
                for name, (cout, cin, k, s, p) in _CONVS.items()
            }
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features
        relu1 = F.relu(f["0"](x))
        relu2 = F.relu(f["3"](F.max_pool2d(relu1, kernel_size=3, stride=2)))
        relu3 = F.relu(f["6"](F.max_pool2d(relu2, kernel_size=3, stride=2)))
        relu4 = F.relu(f["8"](relu3))
        relu5 = F.relu(f["10"](relu4))
        return [relu1, relu2, relu3, relu4, relu5]


def _unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # LPIPS divides each spatial feature vector by its L2 norm over channels.
    return feat / (torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 (AlexNet, linear heads) as a frozen module; differentiable w.r.t. its inputs.

    ``forward(a, b)`` takes float tensors in [0, 1] shaped (N, C, H, W) with C = 1 or 3 (one channel is
    repeated to three) and returns the distance per image, shape (N,).
    """

    def __init__(self, weights: str | Path = LPIPS_WEIGHTS) -> None:
        super().__init__()
        self.net = _AlexNetFeatures()
        self.lin = nn.ModuleList(
            nn.Conv2d(cout, 1, kernel_size=1, bias=False) for cout, *_ in _CONVS.values()
        )
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        state = load_file(str(weights))
        self.net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
        self.lin.load_state_dict({k[len("lin.") :]: v for k, v in state.items() if k.startswith("lin.")})
        self.requires_grad_(False)
        self.eval()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(self.shift.dtype) * 2.0 - 1.0  # LPIPS works on [-1, 1]
        return (x - self.shift) / self.scale

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised AlexNet features of (N, C, H, W) images in [0, 1]: computed once for a reference
        that several predictions are compared with (see `distance`)."""
        # channels-last: oneDNN's faster convolution layout on a CPU (about 12% on AlexNet at 256x256)
        x = self._prepare(x).contiguous(memory_format=torch.channels_last)
        return [_unit_normalize(f).contiguous() for f in self.net(x)]

    def distance(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS per image, shape (N,), between two images' `features`."""
        if [f.shape for f in feats_a] != [f.shape for f in feats_b]:
            raise ValueError("feature shapes differ (images of different shapes)")
        total = torch.zeros(feats_a[0].shape[0], device=self.shift.device, dtype=self.shift.dtype)
        for lin, fa, fb in zip(self.lin, feats_a, feats_b, strict=True):
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))  # spatial average of the weighted map
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
        return self.distance(self.features(a), self.features(b))


_CACHE: dict[tuple[str, str], LPIPS] = {}
_CACHE_LOCK = threading.Lock()


def _shared_lpips(device: torch.device) -> LPIPS:
    key = (str(device), str(LPIPS_WEIGHTS))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = LPIPS().to(device)
        return _CACHE[key]


def lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 AlexNet distance per image between (N, C, H, W) tensors in [0, 1]; returns (N,).

    Uses one cached frozen network per device. Gradients flow to the inputs if they require them
    (wrap the call in ``torch.no_grad()`` for evaluation).
    """
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    return _shared_lpips(a.device)(a, b)


def lpips_features(x: torch.Tensor) -> list[torch.Tensor]:
    """The cached network's `LPIPS.features` of (N, C, H, W) images in [0, 1]."""
    x = torch.as_tensor(x)
    return _shared_lpips(x.device).features(x)


def lpips_distance(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS per image from two `lpips_features` results: equal to `lpips(a, b)`, and a reference's features
    are computed once for every prediction scored against it."""
    return _shared_lpips(feats_a[0].device).distance(feats_a, feats_b)
