"""Masked statistics, whitening and the response mask.

Every function here treats ``mask`` as a float (or bool) tensor of the same
shape as ``x`` with 1.0 on the entries that count and 0.0 elsewhere. Entries
where the mask is 0 never influence a result, even if they hold ``nan`` or
``inf`` (padding log-probs can be ``-inf``): they are replaced by 0 with
``torch.where`` before any arithmetic, so neither the value nor the gradient
can be poisoned by them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "whiten",
    "masked_moments",
    "whiten_from_moments",
    "response_mask",
    "last_token_values",
]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` with masked-out entries forced to exactly 0 (nan/inf safe)."""
    if mask.dtype == torch.bool:
        return torch.where(mask, x, 0.0)
    return torch.where(mask != 0, x * mask.to(x.dtype), 0.0)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the masked entries.

    Shapes: ``x``, ``mask``: any shape, e.g. ``[batch, response_len]``.
    Returns a 0-dim tensor (``dim=None``) or ``x`` reduced over ``dim``.

        masked_sum = sum_i mask_i * x_i
    """
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of the masked entries.

    Shapes: ``x``, ``mask``: e.g. ``[batch, response_len]``. ``dim=None`` gives
    a 0-dim tensor: the TOKEN-level mean over every masked entry of the whole
    batch (each token weighs the same, so long responses weigh more than
    short ones). ``dim=-1`` gives one mean per row, ``[batch]``.

        masked_mean = sum_i mask_i * x_i / sum_i mask_i

    An empty mask (sum 0) gives 0 rather than ``nan`` (the numerator is 0 and
    the denominator is clamped), so a batch with no counted token contributes
    nothing instead of poisoning the run.
    """
    mask_f = mask.to(x.dtype)
    num = masked_sum(x, mask, dim)
    den = mask_f.sum() if dim is None else mask_f.sum(dim=dim)
    return num / den.clamp(min=torch.finfo(x.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (over the whole tensor), 0-dim.

    Shapes: ``x``, ``mask``: e.g. ``[batch, response_len]``. With
    ``n = sum(mask)`` and ``mu = masked_mean(x, mask)``:

        var_biased   = sum_i mask_i * (x_i - mu)^2 / n
        var_unbiased = var_biased * n / (n - 1)        (Bessel's correction)

    With fewer than two masked entries the unbiased variance is undefined; we
    return 0 then (so :func:`whiten` only centres). No host sync is needed.
    """
    mu = masked_mean(x, mask)
    var = masked_mean((x - mu) ** 2, mask)
    if not unbiased:
        return var
    n = mask.to(x.dtype).sum()
    return torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.zeros_like(var))


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``[n, sum, sum of squares]`` of the masked entries of ``x``, fp64, shape ``[3]``.

    Moments add up: the moments of several batches (or ranks, with an all-reduce sum) are the
    sum of their moments, so :func:`whiten_from_moments` can whiten over all of them at once.
    """
    xd = _masked(x.detach().double(), mask)
    n = (mask != 0).sum().double() if mask.dtype != torch.bool else mask.sum().double()
    return torch.stack([n, xd.sum(), xd.square().sum()])


def whiten_from_moments(x: Tensor, mask: Tensor, moments: Tensor, shift_mean: bool = True,
                        eps: float = 1e-8) -> Tensor:
    """:func:`whiten` with the statistics of ``moments`` (from :func:`masked_moments`, possibly
    summed over batches and ranks) instead of ``x``'s own. Shapes as :func:`whiten`.

        mu  = sum / n,   var = (sumsq / n - mu^2) * n / (n - 1)     (0 when n < 2)
        w   = (x - mu) / sqrt(var + eps)     (+ mu if not shift_mean)
    """
    n, s, ss = (float(v) for v in moments.double().cpu())
    mu = s / n if n > 0 else 0.0
    var = max(ss / n - mu * mu, 0.0) * n / (n - 1) if n > 1 else 0.0
    w = (x - mu) * (var + eps) ** -0.5
    if not shift_mean:
        w = w + mu
    return _masked(w, mask)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance using masked entries only.

    Shapes: ``x``, ``mask``: ``[batch, response_len]`` -> ``[batch, response_len]``.
    Statistics are taken over all masked entries of ``x``, the variance is the
    UNBIASED one of :func:`masked_var`:

        w = (x - mu) / sqrt(var_unbiased + eps)
        w = w + mu              if not shift_mean  (rescale only, keep the mean)

    Masked-out entries are 0 in the output. To whiten over several batches or
    ranks at once (PPO whitens over the whole update, all ranks), sum their
    :func:`masked_moments` and use :func:`whiten_from_moments` (TRL whitens per
    rank; DeepSpeed-Chat does not whiten).
    """
    mu = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    w = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        w = w + mu
    return _masked(w, mask)


def response_mask(
    response_ids: Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
) -> Tensor:
    """The action mask of generated responses: 1.0 up to AND including the first EOS.

    Shapes: ``response_ids``: ``[batch, response_len]`` (the generated tokens
    only, prompt removed) -> float ``[batch, response_len]``.

        mask_t = 1  if no EOS occurs at any position < t
                 0  otherwise

    so the first EOS counts (the policy chose to stop) and everything after
    it is 0. A row with no EOS is a truncated answer and counts entirely.
    The mask is driven by the FIRST EOS position, never by pad ids, so it is
    correct when ``pad_token_id == eos_token_id``. When the pad id differs
    from every EOS id, pad tokens are additionally excluded (a backend that
    pads without emitting EOS, e.g. stopped on a stop string).

    ``eos_token_id`` may be a list (Llama-3 has ``<|eot_id|>`` and
    ``<|end_of_text|>``): any of them ends the response.
    """
    if response_ids.dim() != 2:
        raise ValueError(
            f"response_ids must be [batch, response_len]; got shape {tuple(response_ids.shape)}"
        )
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos_ids:
        raise ValueError("eos_token_id is an empty list; pass at least one EOS id")
    eos_t = torch.tensor(eos_ids, dtype=response_ids.dtype, device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_t).long()
    # number of EOS strictly before t: 0 means "not finished yet at t"
    eos_before = is_eos.cumsum(dim=-1) - is_eos
    mask = eos_before == 0
    if pad_token_id is not None and pad_token_id not in eos_ids:
        mask = mask & (response_ids != pad_token_id)
    return mask.float()


def last_token_values(values: Tensor, mask: Tensor) -> Tensor:
    """The value at the LAST masked position of each row.

    Shapes: ``values``: ``[batch, seq_len]``, ``mask``: ``[batch, seq_len]``
    -> ``[batch]``. Used to read a reward model's score at the EOS (its last
    non-pad token) the same way in training and in use. A row with an empty
    mask reads position 0.

        last_b = max{t : mask[b, t] = 1};   out_b = values[b, last_b]
    """
    return values.gather(-1, _last_index(mask).clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _last_index(mask: Tensor) -> Tensor:
    """Index of the last non-zero mask entry per row (``[batch]``), -1 for an empty row."""
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, pos, torch.full_like(pos, -1)).max(dim=-1).values
