"""k-space primitives shared by the k-space acquisition (cinesr.model.degrade) and data consistency.

Grid convention: a low-resolution pixel i sits at the centre of high-resolution pixels
factor*i .. factor*i + factor - 1 (as for area averaging, and as the derived series' geometry says),
so the band is taken from the image shifted by (factor - 1) / 2 pixels.
"""

from __future__ import annotations

import numpy as np


def shift(x: np.ndarray, d: float) -> np.ndarray:
    """Move the content of (..., H, W) real frames by d pixels down and right (Fourier phase ramp)."""
    h, w = x.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(x) * np.exp(-2j * np.pi * (fy + fx) * d)))


def tukey(n: int, taper: float) -> np.ndarray:
    """Tukey window over n centred k-space samples: flat, then a Hann taper over the outer `taper` fraction."""
    x = np.abs(np.arange(n) - (n - 1) / 2.0) / (n / 2.0)  # 0 at the centre, about 1 at the edges
    edge = 1.0 - taper
    w = np.ones(n)
    outer = x > edge
    w[outer] = 0.5 + 0.5 * np.cos(np.pi * (x[outer] - edge) / max(taper, 1e-9))
    return w


def band(x: np.ndarray, factor: int, taper: float = 0.0) -> np.ndarray:
    """The central 1/factor of k-space per direction of (..., H, W) frames, block-centred, as an image on
    the small grid (intensities keep their scale); `taper` > 0 apodises the band.

    Sampling folds the +Nyquist frequency of an even-sized small grid onto -Nyquist; so does this, which
    keeps the band of a real image real and makes `unband` its exact inverse."""
    h, w = x.shape[-2:]
    hh, ww = h // factor, w // factor
    spectrum = np.fft.fftshift(np.fft.fft2(shift(np.asarray(x, np.float64), -(factor - 1) / 2.0)), axes=(-2, -1))
    top, left = h // 2 - hh // 2, w // 2 - ww // 2
    kept = spectrum[..., top : top + hh + 1, left : left + ww + 1].copy()
    if hh % 2 == 0:
        kept[..., 0, :] += kept[..., hh, :]
    if ww % 2 == 0:
        kept[..., :, 0] += kept[..., :, ww]
    kept = kept[..., :hh, :ww]
    if taper > 0:
        kept = kept * np.outer(tukey(hh, taper), tukey(ww, taper))
    return np.fft.ifft2(np.fft.ifftshift(kept, axes=(-2, -1))) / (factor * factor)


def unband(r: np.ndarray, factor: int) -> np.ndarray:
    """The inverse of `band` on its range: (..., h, w) real -> (..., h*factor, w*factor), band-limited
    (zero-filled k-space, the Nyquist frequency split evenly between its two signs), block-centred;
    band(unband(r)) == r."""
    h, w = r.shape[-2:]
    hh, ww = h * factor, w * factor
    spectrum = np.zeros(r.shape[:-2] + (hh, ww), dtype=complex)
    top, left = hh // 2 - h // 2, ww // 2 - w // 2
    spectrum[..., top : top + h, left : left + w] = np.fft.fftshift(np.fft.fft2(r), axes=(-2, -1))
    if h % 2 == 0:
        spectrum[..., top, :] /= 2
        spectrum[..., top + h, :] = spectrum[..., top, :]
    if w % 2 == 0:
        spectrum[..., :, left] /= 2
        spectrum[..., :, left + w] = spectrum[..., :, left]
    up = np.real(np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)))) * (factor * factor)
    return shift(up, (factor - 1) / 2.0)
