"""Exponential moving average of weights, and running moments for reward normalisation."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ema_update", "RunningMoments"]


@torch.no_grad()
def ema_update(ema_params: Iterable[Tensor], params: Iterable[Tensor], beta: float = 0.992) -> None:
    """In-place EMA of weights: ``ema = beta * ema + (1 - beta) * p``, without autograd.

    Shapes: any; ``ema_params`` and ``params`` are paired in order (e.g.
    ``ema_model.parameters()`` and ``model.parameters()``) and each pair must
    have the same shape. ``p`` is converted to the EMA tensor's device and
    dtype, so the EMA may live on CPU or in another precision. Non-floating
    tensors (integer buffers) are copied. Keep the EMA in fp32 if you can: with
    beta 0.992 a bf16 EMA (8 bits of mantissa) drops most updates. Under
    ZeRO-3 the caller gathers the partitioned parameters first.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"EMA beta must be in [0, 1]; got {beta}")
    for i, (e, p) in enumerate(zip(ema_params, params, strict=True)):
        if e.shape != p.shape:
            raise ValueError(f"EMA tensor {i} has shape {tuple(e.shape)} but the parameter has {tuple(p.shape)}")
        src = p.detach().to(device=e.device, dtype=e.dtype)
        if e.is_floating_point() or e.is_complex():
            e.lerp_(src, 1.0 - beta)  # e + (1 - beta) * (p - e) = beta * e + (1 - beta) * p
        else:
            e.copy_(src)


class RunningMoments:
    """Running mean and standard deviation of a stream of values (e.g. reward scores).

    Batches are merged exactly with Chan et al.'s parallel form of Welford's
    algorithm: for the running ``(n_a, mean_a, M2_a)`` and a batch
    ``(n_b, mean_b, M2_b)``, with ``d = mean_b - mean_a`` and ``n = n_a + n_b``:

        mean = mean_a + d * n_b / n
        M2   = M2_a + M2_b + d^2 * n_a * n_b / n
        var  = M2 / (n - 1)      (unbiased),  std = sqrt(var)

    Before any update ``mean = 0`` and ``std = 1`` (normalising is then a no-op).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Unbiased variance (1.0 before two values have been seen)."""
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Add the values of ``xs`` (any shape); returns the batch's (mean, unbiased std)."""
        xs = xs.detach().double().flatten()
        n_b = xs.numel()
        if n_b == 0:
            return self.mean, self.std
        mean_b = xs.mean().item()
        m2_b = (xs - mean_b).square().sum().item()
        n = self.count + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d * d * self.count * n_b / n
        self.count = n
        batch_std = math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0
        return mean_b, batch_std

    def update_from_moments(self, n_b: float, sum_b: float, sumsq_b: float) -> None:
        """Add a batch given by its count, sum and sum of squares (e.g. all-reduced over ranks,
        so every rank keeps the same running statistics)."""
        if n_b <= 0:
            return
        mean_b = sum_b / n_b
        m2_b = max(sumsq_b - n_b * mean_b * mean_b, 0.0)
        n = self.count + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d * d * self.count * n_b / n
        self.count = int(n)

    def normalize(self, xs: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
        """``(xs - mean) / (std + eps)``; with ``shift_mean=False`` only ``xs / (std + eps)``."""
        centred = xs - self.mean if shift_mean else xs
        return centred / (self.std + eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
