"""Registry of MONAI networks a plan may name, built from scratch (no pretrained weights).

Factories take plain values, like MONAI's own network factories, so a plan (data) turns into a
model (code the silo installed) without any code travelling with the plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from training_plan.errors import PlanError, UnknownModelError

if TYPE_CHECKING:
    import torch

    from training_plan.schema import ModelSpec


NORM_LAYERS: dict[str, tuple[str, dict[str, Any]]] = {
    "group": ("group", {"num_groups": 8}),
    "batch": ("batch", {}),
    "instance": ("instance", {"affine": True}),
}
"""Plan name -> MONAI norm argument. Every registry network has channel counts divisible by 8."""


def _resnet(depth: int) -> Callable[..., torch.nn.Module]:
    def build(in_channels: int, num_outputs: int, **args: Any) -> torch.nn.Module:
        from monai.networks import nets

        factory = getattr(nets, f"resnet{depth}")
        return factory(
            pretrained=False,
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=num_outputs,
            **args,
        )

    return build


def _efficientnet(variant: str) -> Callable[..., torch.nn.Module]:
    def build(in_channels: int, num_outputs: int, **args: Any) -> torch.nn.Module:
        from monai.networks.nets import EfficientNetBN

        return EfficientNetBN(
            variant,
            pretrained=False,
            spatial_dims=2,
            in_channels=in_channels,
            num_classes=num_outputs,
            **args,
        )

    return build


def _densenet121(in_channels: int, num_outputs: int, **args: Any) -> torch.nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=2, in_channels=in_channels, out_channels=num_outputs, pretrained=False, **args
    )


UNET_CHANNELS = (8, 16, 32, 64)
UNET_STRIDES = (2, 2, 2)
BASICUNET_FEATURES = (8, 8, 16, 32, 64, 8)
"""Small 3D segmentation networks: a silo trains them on CPU in minutes."""


def _unet(in_channels: int, num_outputs: int, **args: Any) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_outputs,
        channels=UNET_CHANNELS,
        strides=UNET_STRIDES,
        **args,
    )


def _basicunet(in_channels: int, num_outputs: int, **args: Any) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_outputs,
        features=BASICUNET_FEATURES,
        **args,
    )


MODEL_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {
    "unet": _unet,
    "basicunet": _basicunet,
    "resnet10": _resnet(10),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "efficientnet-b0": _efficientnet("efficientnet-b0"),
    "efficientnet-b1": _efficientnet("efficientnet-b1"),
    "densenet121": _densenet121,
}
"""Name -> factory(in_channels, num_outputs, **args). Every entry is a MONAI network."""


DOWNSAMPLING: dict[str, int] = {
    "resnet10": 16,
    "resnet18": 16,
    "resnet34": 16,
    "efficientnet-b0": 32,
    "efficientnet-b1": 32,
    "densenet121": 32,
    "unet": 8,
    "basicunet": 16,
}
"""How much each network shrinks its input before its deepest normalisation layer."""

MODEL_TASKS: dict[str, str] = {name: "classification" for name in MODEL_REGISTRY}
MODEL_TASKS.update(unet="segmentation", basicunet="segmentation")
"""The task each registered network does: classification nets end in one logit per image,
segmentation nets (3D) in one logit per voxel."""

_SKIP_CONNECTED = ("unet", "basicunet")


def input_multiple(name: str) -> int:
    """The input side must be a multiple of this: encoder-decoder networks concatenate each
    upsampled map with the encoder's, which must have the same size (classification nets pool
    and accept any side)."""
    return DOWNSAMPLING.get(name, 1) if name in _SKIP_CONNECTED else 1


def min_input_size(name: str, norm: str) -> int:
    """Smallest input side the network trains on with this norm.

    Instance norm needs more than one spatial element per channel at the deepest layer, so the
    input must be at least twice the network's downsampling; the other norms need one element.
    """
    factor = DOWNSAMPLING.get(name, 1)
    return 2 * factor if norm == "instance" else factor


def build_model(
    name: str,
    args: dict[str, Any] | None = None,
    *,
    norm: str = "instance",
    in_channels: int = 1,
    num_outputs: int = 1,
) -> torch.nn.Module:
    """Build a freshly initialised network from the registry.

    Raises UnknownModelError for a name outside the registry and PlanError when MONAI rejects the
    plan's model arguments (the message says which).
    """
    try:
        factory = MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise UnknownModelError(f"unknown model '{name}' (known: {known})") from None
    if norm not in NORM_LAYERS:
        raise PlanError(f"unknown norm '{norm}' (known: {', '.join(NORM_LAYERS)})")
    kwargs = {"norm": NORM_LAYERS[norm], **(args or {})}
    try:
        model = factory(in_channels, num_outputs, **kwargs)
    except TypeError as exc:
        raise PlanError(f"model '{name}' does not accept the arguments {args}: {exc}") from exc
    if norm != "batch":
        _replace_batch_norm(model, norm)
    return model


def _replace_batch_norm(module: torch.nn.Module, norm: str) -> None:
    """Swap every BatchNorm left in the network for the plan's norm.

    Some MONAI networks pass `norm` to only part of their layers (ResNet's residual blocks keep
    BatchNorm in MONAI 1.6); a plan asking for group norm must get it everywhere, or running
    statistics would still be averaged across silos.
    """
    from torch import nn

    for child_name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            if norm == "group":
                replacement: nn.Module = nn.GroupNorm(math.gcd(8, channels), channels)
            else:
                replacement = nn.GroupNorm(channels, channels)  # instance norm, affine
            setattr(module, child_name, replacement)
        else:
            _replace_batch_norm(child, norm)


def build_plan_model(spec: ModelSpec, in_channels: int = 1) -> torch.nn.Module:
    """Build the network a plan's `model` entry describes (name, args, norm), taking
    ``in_channels`` input channels (the plan's ``preprocessing.channels``)."""
    return build_model(spec.name, dict(spec.args), norm=spec.norm, in_channels=in_channels)
