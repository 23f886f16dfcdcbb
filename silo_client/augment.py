"""Training-time augmentations a plan may ask for, run by the silo's installed code.

The plan only names them (``preprocessing.augmentations``, an allow-list in the schema); how they
run is decided here, identically at every silo:

- ``flip-horizontal`` / ``flip-vertical``: each example mirrored left-right / up-down with
  probability 1/2 (for volumes: within each slice, so the slice order is kept);
- ``rotate-90``: each example rotated in plane by k * 90 degrees, k uniform in {0, 1, 2, 3}
  (inputs are square after preprocessing, so shapes never change);
- ``intensity-jitter``: each example's intensities scaled by U(0.9, 1.1) and shifted by
  U(-0.05, 0.05) (scanner calibration differs between hospitals), then clipped to [0, 1].

Spatial augmentations move a segmentation mask with its image; intensity jitter never touches a
target. The draws come from their own generator, seeded from the round's seed, so a plan without
augmentations trains exactly as before and a plan with them is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

JITTER_SCALE = 0.1
JITTER_SHIFT = 0.05
SEED_OFFSET = 0x5EED


class Augmenter:
    """Applies the plan's augmentations to a batch (inputs, and targets when they are masks)."""

    def __init__(self, names: Sequence[str], seed: int) -> None:
        unknown = set(names) - {"flip-horizontal", "flip-vertical", "rotate-90", "intensity-jitter"}
        if unknown:
            raise ValueError(f"augmentations {sorted(unknown)} are not run by this silo")
        self.names = tuple(names)
        self.generator = torch.Generator().manual_seed(seed + SEED_OFFSET)

    def __bool__(self) -> bool:
        return bool(self.names)

    def _coin(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < 0.5

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, spatial_targets: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch; ``spatial_targets`` when targets are masks shaped like inputs."""
        n = inputs.shape[0]
        if "flip-horizontal" in self.names:
            inputs, targets = _where(self._coin(n), inputs, targets, spatial_targets, _flip(-1))
        if "flip-vertical" in self.names:
            inputs, targets = _where(self._coin(n), inputs, targets, spatial_targets, _flip(-2))
        if "rotate-90" in self.names:
            turns = torch.randint(0, 4, (n,), generator=self.generator)
            for k in (1, 2, 3):
                inputs, targets = _where(turns == k, inputs, targets, spatial_targets, _rot(k))
        if "intensity-jitter" in self.names:
            shape = (n,) + (1,) * (inputs.dim() - 1)
            scale = 1 + JITTER_SCALE * (2 * torch.rand(shape, generator=self.generator) - 1)
            shift = JITTER_SHIFT * (2 * torch.rand(shape, generator=self.generator) - 1)
            inputs = (inputs * scale + shift).clamp(0.0, 1.0)
        return inputs, targets


def _flip(dim: int):
    return lambda t: torch.flip(t, dims=(dim,))


def _rot(k: int):
    return lambda t: torch.rot90(t, k, dims=(-2, -1))


def _where(pick, inputs, targets, spatial_targets, op):
    """Apply ``op`` to the picked examples (and to their masks when targets are spatial)."""
    if not bool(pick.any()):
        return inputs, targets
    shape = (-1,) + (1,) * (inputs.dim() - 1)
    inputs = torch.where(pick.view(shape), op(inputs), inputs)
    if spatial_targets:
        targets = torch.where(pick.view(shape), op(targets), targets)
    return inputs, targets
