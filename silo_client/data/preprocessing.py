"""How a DICOM image becomes the plan's tensor: the :class:`Preprocessing` of a plan and
:func:`preprocess_pixels`.

Grayscale images (after the modality LUT: RescaleSlope/Intercept, a missing slope counts as 1
and a missing intercept as 0) are windowed to [0, 1] (the plan's window, else the file's
WindowCenter/Width, else the image's min/max), MONOCHROME1 is inverted; colour images (RGB,
YBR_*, PALETTE COLOR, decoded to RGB) are scaled by their full range and kept as RGB
(``channels`` 3) or turned into their luma (``channels`` 1 with ``to_grayscale``). Then the
image is padded to a square and resized to ``input_size`` with anti-aliasing (a MONAI
``Compose``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureType, ScaleIntensityRange

from silo_client.data.dicom_read import (
    misfit,
)
from silo_client.errors import DataError

__all__ = ["PREPROCESSING_VERSION", "Preprocessing", "preprocess_pixels"]

#: Bumped whenever the preprocessing code changes its output; part of the cache key.
PREPROCESSING_VERSION = "3"


@dataclass(frozen=True)
class Preprocessing:
    """How a DICOM image becomes a ``[channels, input_size, input_size]`` float32 tensor in
    [0, 1].

    ``window_center``/``window_width`` are in modality-LUT units (HU for CT); both ``None``
    means: use each file's WindowCenter/WindowWidth, falling back to the image's min/max.
    Colour images are not windowed: RGB is scaled by its full range. ``channels`` 1 takes
    grayscale images (colour ones too when ``to_grayscale``: their luma); 3 takes colour
    images as RGB. An image that does not fit is skipped with the reason (:meth:`misfit`).
    """

    input_size: int = 64
    window_center: float | None = None
    window_width: float | None = None
    channels: int = 1
    to_grayscale: bool = False

    def __post_init__(self) -> None:
        """Validate the fields (DataError with a fix hint)."""
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise DataError(f"preprocessing input_size must be an integer, got {self.input_size!r}")
        if not 8 <= self.input_size <= 4096:
            raise DataError(
                f"preprocessing input_size must be in [8, 4096] pixels, got {self.input_size}"
            )
        if (self.window_center is None) != (self.window_width is None):
            raise DataError(
                "preprocessing window needs both window_center and window_width "
                f"(got center={self.window_center}, width={self.window_width}); set both or neither"
            )
        if self.window_width is not None and not (
            math.isfinite(self.window_width) and self.window_width > 0
        ):
            raise DataError(f"preprocessing window_width must be > 0, got {self.window_width}")
        if self.window_center is not None and not math.isfinite(self.window_center):
            raise DataError(f"preprocessing window_center must be finite, got {self.window_center}")
        if self.channels not in (1, 3):
            raise DataError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if self.to_grayscale and self.channels != 1:
            raise DataError("preprocessing to_grayscale needs channels 1 (3 keeps RGB)")

    def misfit(self, photometric: str) -> str | None:
        """Why an image of this PhotometricInterpretation does not fit, or None when it does."""
        return misfit(photometric, self.channels, self.to_grayscale)

    def fingerprint(self) -> str:
        """Stable hash of the preprocessing (fields + code version), used as a cache key."""
        fields = {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        text = json.dumps({"version": PREPROCESSING_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def spatial_transform(self) -> Compose:
        """MONAI transform: pad a ``[1, H, W]`` image to a square, resize, float32 tensor."""
        size = self.input_size
        return Compose(
            [
                _pad_to_square,
                _Resize(size),
                _clip_unit,
                EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
            ]
        )

    def intensity_transform(self, lower: float, upper: float, invert: bool) -> Compose:
        """MONAI transform: window ``[lower, upper]`` to [0, 1] (clipped), inverted if asked."""
        steps: list[Any] = [
            ScaleIntensityRange(a_min=lower, a_max=upper, b_min=0.0, b_max=1.0, clip=True)
        ]
        if invert:
            steps.append(_invert_unit)
        return Compose(steps)


def _pad_to_square(img: torch.Tensor) -> torch.Tensor:
    """Zero-pad (black after windowing) a ``[C, H, W]`` image to a centred square."""
    h, w = int(img.shape[-2]), int(img.shape[-1])
    if h == w:
        return img
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = (left, side - w - left, top, side - h - top)
    return torch.nn.functional.pad(img, pad, value=0.0)


class _Resize:
    """Bilinear resize of a ``[C, H, W]`` tensor with anti-aliasing when shrinking.

    ``torch.nn.functional.interpolate(antialias=True)`` (a separable triangle filter) is
    several times faster than MONAI ``Resize(anti_aliasing=True)``'s Gaussian convolution.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) == (self.size, self.size):
            return img
        return torch.nn.functional.interpolate(
            img[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
            antialias=True,
        )[0]  # fmt: skip


def _clip_unit(img: torch.Tensor) -> torch.Tensor:
    return torch.clamp(img, 0.0, 1.0)


def _invert_unit(img: torch.Tensor) -> torch.Tensor:
    return 1.0 - img


def preprocess_pixels(
    pixels: np.ndarray,
    file_window: tuple[float, float],
    photometric: str,
    preprocessing: Preprocessing,
    spatial: Compose | None = None,
) -> torch.Tensor:
    """One image -> ``[channels, S, S]`` float32 tensor in [0, 1].

    Grayscale ``[H, W]`` (modality-LUT units) is windowed; colour ``[H, W, 3]`` RGB is scaled
    by ``file_window`` = [0, full scale] and, for a one-channel plan, turned into its luma
    (ITU-R BT.601). DataError when the image does not fit the plan's channels.
    """
    reason = preprocessing.misfit(photometric)
    if reason:
        raise DataError(reason)
    spatial = spatial if spatial is not None else preprocessing.spatial_transform()
    if pixels.ndim == 3:
        lower, upper = file_window
        scaled = (pixels.astype(np.float32) - lower) / max(upper - lower, 1e-6)
        img = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))
        if preprocessing.channels == 1:
            img = torch.tensordot(_LUMA, img, dims=([0], [0]))[None]
        img = torch.clamp(img, 0.0, 1.0)
        return torch.as_tensor(spatial(img)).as_subclass(torch.Tensor)
    if preprocessing.window_center is not None and preprocessing.window_width is not None:
        half = preprocessing.window_width / 2.0
        lower, upper = preprocessing.window_center - half, preprocessing.window_center + half
    else:
        lower, upper = file_window
    if upper <= lower:
        upper = lower + 1.0
    invert = photometric == "MONOCHROME1"
    img = torch.from_numpy(pixels.astype(np.float32))[None]
    img = preprocessing.intensity_transform(lower, upper, invert)(img)
    return torch.as_tensor(spatial(img)).as_subclass(torch.Tensor)


_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
"""ITU-R BT.601 luma weights: a colour image seen by a one-channel plan."""
