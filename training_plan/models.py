"""Registry of MONAI networks a plan may name, built from scratch (no pretrained weights).

Factories take plain values, like MONAI's own network factories, so a plan (data) turns into a
model (code the silo installed) without any code travelling with the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from training_plan.errors import PlanError, UnknownModelError

if TYPE_CHECKING:
    import torch


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


MODEL_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {
    "resnet10": _resnet(10),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "efficientnet-b0": _efficientnet("efficientnet-b0"),
    "efficientnet-b1": _efficientnet("efficientnet-b1"),
    "densenet121": _densenet121,
}
"""Name -> factory(in_channels, num_outputs, **args). Every entry is a MONAI network."""


def build_model(
    name: str, args: dict[str, Any] | None = None, *, in_channels: int = 1, num_outputs: int = 1
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
    try:
        return factory(in_channels, num_outputs, **(args or {}))
    except TypeError as exc:
        raise PlanError(f"model '{name}' does not accept the arguments {args}: {exc}") from exc
