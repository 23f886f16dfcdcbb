"""Numpy drawing primitives the synthetic generators share: soft ellipses, blur, and values
spread over a range so hospitals surely differ."""

from __future__ import annotations

import numpy as np


def _spread(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """n values evenly spread over [lo, hi] in random order (so hospitals surely differ)."""
    if n == 1:
        return np.array([(lo + hi) / 2.0])
    return rng.permutation(np.linspace(lo, hi, n))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (numpy only)."""
    if sigma <= 0.05:
        return img
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.pad(img, ((radius, radius), (0, 0)), mode="reflect")
    out = np.lib.stride_tricks.sliding_window_view(out, kernel.size, axis=0) @ kernel
    out = np.pad(out, ((0, 0), (radius, radius)), mode="reflect")
    return np.lib.stride_tricks.sliding_window_view(out, kernel.size, axis=1) @ kernel


def _soft_ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, theta: float,
    edge: float,
) -> np.ndarray:  # fmt: skip
    """Soft (sigmoid-edged) filled ellipse in [0, 1]; ``edge`` is the edge width relative."""
    c, s = np.cos(theta), np.sin(theta)
    dy, dx = yy - cy, xx - cx
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -50, 50)))
