"""Patient-level DP-SGD: the unit of privacy is the patient, not the image.

Why our own loop and not Opacus' ``PrivacyEngine``: Opacus clips each *example's* gradient
(per-sample hooks), so a patient with ten images would get ten clipped contributions and ten
times the influence the guarantee claims. Here each Poisson-sampled patient is one microbatch:
the gradient of the mean loss over that patient's images is computed with plain autograd (any
network, no per-layer grad-sample support needed), clipped to ``clip_norm`` as a whole, summed
over the sampled patients, and Gaussian noise of ``noise_multiplier * clip_norm`` is added before
dividing by the expected number of patients per step. Opacus still does the accounting
(training_plan/privacy.py).

The patient sample and the noise come from AES-CTR keyed by ``os.urandom``, never from a
seeded generator: noise anyone could regenerate from the plan's seed would protect nothing.
So DP rounds are not bit-for-bit reproducible, by design.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import nn

from silo_client.augment import Augmenter
from silo_client.errors import SiloError
from silo_client.training import TrainResult, make_optimizer
from training_plan.privacy import PrivacyBudget
from training_plan.schema import TrainingSpec


class PrivacyTrainingError(SiloError):
    """A model or dataset that patient-level DP-SGD cannot train as the plan asks."""


class SecureRandom:
    """Uniforms and Gaussians from an AES-128-CTR keystream keyed by ``os.urandom``."""

    def __init__(self) -> None:
        key = os.urandom(32)
        self._stream = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor()

    def uniform(self, n: int) -> np.ndarray:
        """n floats uniform in (0, 1) with 53 random bits each (never exactly 0)."""
        raw = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)

    def normal(self, n: int) -> np.ndarray:
        """n standard normal floats (Box-Muller over the secure uniforms)."""
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
        return z[:n]


def refuse_batch_norm(model: nn.Module) -> None:
    """Raise when the network has BatchNorm: it mixes patients and its running statistics
    would leave the silo without noise."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise PrivacyTrainingError(
                f"layer '{name}' is BatchNorm, which patient-level DP cannot train (it mixes "
                "patients and its running statistics leave without noise); plan model.norm "
                "instance or group replaces it"
            )


def patient_index(groups: Sequence[str]) -> list[torch.Tensor]:
    """Row indices of each patient's images (patients in first-seen order)."""
    rows: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        rows.setdefault(group, []).append(i)
    return [torch.as_tensor(r, dtype=torch.long) for r in rows.values()]


def train_private(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    groups: Sequence[str],
    spec: TrainingSpec,
    budget: PrivacyBudget,
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    proximal_mu: float = 0.0,
    augment: Augmenter | None = None,
    spatial_targets: bool = False,
) -> TrainResult:
    """One round of patient-level DP-SGD in place: ``budget.steps_per_round`` steps.

    Each step Poisson-samples patients with ``budget.sampling_rate``; each sampled patient's
    gradient (mean loss over their images, in chunks of ``spec.batch_size``) is clipped to
    ``budget.clip_norm``; the sum gets N(0, (sigma * clip)^2) noise and is divided by the
    expected number of patients per step, then the plan's optimizer steps. The FedProx gradient
    mu (w - w_global) depends on no data and is added after the noise.
    """
    refuse_batch_norm(model)
    if len(groups) != len(targets):
        raise PrivacyTrainingError("every training image needs its patient group")
    patients = patient_index(groups)
    if not patients:
        raise PrivacyTrainingError("no training patients")
    torch.manual_seed(seed)  # dropout and augmentation only; sampling and noise are secure
    rng = SecureRandom()
    params = [p for p in model.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = make_optimizer(model, spec)
    expected = budget.sampling_rate * len(patients)
    noise_std = budget.noise_multiplier * budget.clip_norm
    targets = targets.float()
    model.train()
    loss_total, loss_count = 0.0, 0
    for _ in range(budget.steps_per_round):
        chosen = np.flatnonzero(rng.uniform(len(patients)) < budget.sampling_rate)
        summed = [torch.zeros_like(p) for p in params]
        for index in chosen:
            rows = patients[int(index)]
            patient_loss = _patient_gradient(
                model,
                params,
                inputs,
                targets,
                rows,
                spec.batch_size,
                loss_fn,
                augment,
                spatial_targets,
            )
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
            scale = min(1.0, budget.clip_norm / (norm + 1e-12))
            for acc, p in zip(summed, params, strict=True):
                if p.grad is not None:
                    acc.add_(p.grad, alpha=scale)
            loss_total += patient_loss
            loss_count += 1
        for acc, p in zip(summed, params, strict=True):
            noise = torch.from_numpy(rng.normal(acc.numel()).astype(np.float32))
            acc.add_(noise.view_as(acc), alpha=noise_std)
            p.grad = acc.div_(expected)
        if global_params is not None:
            for p, g in zip(params, global_params, strict=True):
                p.grad.add_(p.detach() - g, alpha=proximal_mu)
        optimizer.step()
    return TrainResult(
        num_examples=len(targets),
        steps=budget.steps_per_round,
        mean_loss=loss_total / max(loss_count, 1),
    )


def _patient_gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    chunk: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    augment: Augmenter | None,
    spatial_targets: bool,
) -> float:
    """Leave in ``p.grad`` the gradient of the patient's mean loss; return that loss."""
    for p in params:
        p.grad = None
    total = 0.0
    n = len(rows)
    for start in range(0, n, chunk):
        part = rows[start : start + chunk]
        x, y = inputs[part], targets[part]
        if augment:
            x, y = augment(x, y, spatial_targets)
        loss = loss_fn(model(x), y) * (len(part) / n)
        loss.backward()
        total += float(loss.detach())
    return total
