"""Group-level statistics and shaping: DAPO's dynamic sampling filter and over-long penalty, and
the unbiased pass@k estimator. Groups are laid out as in advantages.py (G consecutive answers per
prompt)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from chatrl.rl.advantages import group_view

__all__ = ["informative_groups", "overlong_penalty", "pass_at_k"]


def informative_groups(scores: Tensor, group_size: int, tol: float = 0.0) -> Tensor:
    """Which groups carry a learning signal: ``[batch]`` scores -> ``[batch / G]`` bool.

        keep_g = max_g(r) - min_g(r) > tol

    A group whose answers all scored the same (all right or all wrong) has zero advantage under
    a group baseline and only dilutes the batch; DAPO's dynamic sampling drops such groups and
    samples more prompts until the batch is full again. ``1 - keep.float().mean()`` is the share
    of zero-variance groups.
    """
    g = group_view(scores.detach().float(), group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) > tol


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, coef: float = 1.0) -> Tensor:
    """DAPO's soft over-long punishment, added to the score: ``[batch]`` answer lengths -> ``[batch]``.

        p(L) = 0                                  L <= max_len - buffer
             = coef * (max_len - buffer - L) / buffer   max_len - buffer < L <= max_len
             = -coef                              L > max_len

    so the penalty grows linearly from 0 to -coef over the last ``buffer`` tokens. ``buffer``
    0 turns it off.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_len:
        raise ValueError(f"the over-long buffer ({buffer}) cannot exceed the maximum length ({max_len})")
    start = max_len - buffer
    ramp = (start - lengths) / buffer
    out = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return coef * torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):

        pass@k = 1 - C(n - c, k) / C(n, k)

    the chance that at least one of k samples drawn without replacement from the n is correct.
    Needs k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
