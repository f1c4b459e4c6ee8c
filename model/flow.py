"""Cyclic optical-flow frame interpolation: a cardiac cine is periodic, so N frames become factor*N.

Frame k of the output at phase j/factor between input frames i and i+1 (i+1 wrapping to 0) is a blend of both
neighbours, each warped along the estimated motion. This is the temporal half of the paper's baseline and the
same interpolation builds the model's training inputs.
"""

from __future__ import annotations

import cv2
import numpy as np

# per interval of a cine, its (forward, backward) flows (H, W, 2) in pixels (cine_flows)
Flows = list[tuple[np.ndarray, np.ndarray]]

# Farneback parameters suited to small, low-resolution cine frames (64x64 and up).
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=9, iterations=5, poly_n=5, poly_sigma=1.1, flags=0)


def _to_u8(frames: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(np.min(frames)), float(np.max(frames))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((frames - lo) * scale, 0, 255).astype(np.uint8), lo, scale


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) in pixels (x, y) such that a(p) ~ b(p + flow(p)); inputs uint8."""
    return cv2.calcOpticalFlowFarneback(a, b, None, **_FARNEBACK)


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out(p) = image(p + flow(p)), bilinear, border replicated."""
    h, w = image.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image.astype(np.float32), gx + flow[..., 0], gy + flow[..., 1],
                     interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def interpolate_pair(a: np.ndarray, b: np.ndarray, phases: np.ndarray,
                     flows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Frames at fractional times `phases` (0 = a, 1 = b) between two float frames, by bidirectional warping."""
    if flows is None:
        stack, _, _ = _to_u8(np.stack([a, b]))
        flows = (optical_flow(stack[0], stack[1]), optical_flow(stack[1], stack[0]))
    forward, backward = flows  # a(p) ~ b(p + forward(p)); b(p) ~ a(p + backward(p))
    out = np.empty((len(phases), *a.shape), dtype=np.float32)
    for k, t in enumerate(np.asarray(phases, dtype=np.float32)):
        if t == 0:
            out[k] = a
            continue
        # A point at p in the intermediate frame came from about p - t*forward in a and p - (1-t)*backward in b;
        # flows are sampled at p, which is accurate for the smooth motion of the heart.
        from_a = _warp(a, -t * forward)
        from_b = _warp(b, -(1 - t) * backward)
        out[k] = (1 - t) * from_a + t * from_b
    return out


def cine_flows(frames: np.ndarray, *, cyclic: bool = True) -> Flows:
    """(T, H, W) -> per interval i -> i+1 (the last wrapping to frame 0 when cyclic) its (forward, backward)
    flows (H, W, 2) in pixels, as interpolate_pair takes them."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise ValueError(f"need (T>=2, H, W) frames, got shape {frames.shape}")
    n = frames.shape[0]
    u8, _, _ = _to_u8(frames)  # one intensity mapping for the whole cine keeps flows comparable
    return [(optical_flow(u8[i], u8[(i + 1) % n]), optical_flow(u8[(i + 1) % n], u8[i]))
            for i in range(n if cyclic else n - 1)]


def scale_flows(flows: Flows, factor: int) -> Flows:
    """Flows of a cine enlarged `factor` times (the same motion on the finer grid, in its pixels)."""
    def up(flow: np.ndarray) -> np.ndarray:
        h, w = flow.shape[:2]
        return cv2.resize(flow, (w * factor, h * factor), interpolation=cv2.INTER_LINEAR) * factor
    return [(up(f), up(b)) for f, b in flows]


def interpolate_cine(frames: np.ndarray, factor: int = 8, *, cyclic: bool = True,
                     flows: Flows | None = None) -> np.ndarray:
    """(T, H, W) -> (factor*T, H, W) for a periodic cine (the last interval wraps to frame 0).

    With cyclic=False, (T, H, W) -> (factor*(T-1)+1, H, W) between the first and last frame.
    Output frame factor*i equals input frame i exactly. flows (cine_flows of these frames or of another
    cine on the same grid): the motion to follow; by default the frames' own.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise ValueError(f"need (T>=2, H, W) frames, got shape {frames.shape}")
    if factor < 1:
        raise ValueError("factor must be >= 1")
    n = frames.shape[0]
    flows = cine_flows(frames, cyclic=cyclic) if flows is None else flows
    if len(flows) != (n if cyclic else n - 1):
        raise ValueError(f"{len(flows)} flows for {n} frames")
    phases = np.arange(factor, dtype=np.float32) / factor
    out = [interpolate_pair(frames[i], frames[(i + 1) % n], phases, pair) for i, pair in enumerate(flows)]
    if not cyclic:
        out.append(frames[-1:])
    return np.concatenate(out)


def interpolate_times(trigger_times: np.ndarray, factor: int = 8, rr_interval: float | None = None) -> np.ndarray:
    """Trigger times (T,) -> (factor*T,), linear within each interval; the last interval wraps over one R-R.

    Without rr_interval the cycle length is the last time plus the median frame spacing. A trigger time is a
    delay after the R wave, so times that the last interval carries past the cycle length (when the first
    frame is later than 0 ms) wrap to the start of the cycle; they are then not in frame order.
    """
    t = np.asarray(trigger_times, dtype=np.float64)
    if t.size < 2 or not np.all(np.isfinite(t)):
        return np.full(t.size * factor, np.nan)
    rr = float(rr_interval) if rr_interval else float(t[-1] - t[0] + np.median(np.diff(t)))
    ends = np.append(t[1:], t[0] + rr)
    phases = np.arange(factor) / factor
    times = (t[:, None] + (ends - t)[:, None] * phases[None, :]).ravel()
    if rr > t[-1]:  # every input time lies within one cycle [0, rr): so must the new ones
        times = np.where(times >= rr, times - rr, times)
    return times
