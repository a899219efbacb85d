"""The clipped policy objective of every online algorithm (PPO, GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++), with its choices as arguments:

- ratio level: per token (PPO, GRPO) or per sequence (GSPO: the geometric mean of the answer's
  token ratios, one ratio per answer);
- clipping: ``clip(ratio, 1 - clip_low, 1 + clip_high)``; symmetric by default, DAPO raises
  ``clip_high`` ("clip-higher") so unlikely tokens can grow;
- loss aggregation over the answer tokens of the batch (see :func:`aggregate_loss`);
- KL to the reference in the loss (GRPO): ``+ kl_coef * aggregate(kl_t)`` with a k1/k2/k3
  estimator (see kl.py).

Shapes: per-token tensors are ``[batch, response_len]``; statistics are detached 0-dim tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatrl.rl.kl import kl_penalty
from chatrl.rl.masks import _masked, masked_mean

__all__ = [
    "LOSS_AGGREGATIONS",
    "RATIO_LEVELS",
    "LOG_RATIO_CLAMP",
    "aggregate_loss",
    "policy_log_ratio",
    "clipped_policy_loss",
]

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
LOG_RATIO_CLAMP = 20.0


def aggregate_loss(per_token: Tensor, action_mask: Tensor, mode: str = "token_mean",
                   max_len: int | None = None) -> Tensor:
    """Reduce per-token losses over the answer tokens of a batch to one number.

    Shapes: ``per_token``, ``action_mask``: ``[batch, response_len]`` -> 0-dim. With
    ``n_i = sum_t mask_it`` the length of answer i, ``B`` the number of answers:

        token_mean               sum_it mask_it x_it / sum_i n_i     every token weighs the same
                                                                     (PPO, DAPO)
        seq_mean_token_mean      1/B sum_i (sum_t mask_it x_it / n_i) every answer weighs the same
                                                                     (GRPO as published)
        seq_mean_token_sum_norm  sum_it mask_it x_it / (B * max_len) Dr. GRPO: a constant divisor,
                                                                     so no length bias

    ``max_len`` (the longest answer allowed, a constant of the run) is needed by the last mode.
    A row with no masked token contributes 0 (its ``n_i`` is clamped to 1).
    """
    x = _masked(per_token, action_mask)
    if mode == "token_mean":
        return masked_mean(per_token, action_mask)
    if mode == "seq_mean_token_mean":
        n = action_mask.to(x.dtype).sum(dim=1).clamp(min=1)
        return (x.sum(dim=1) / n).mean()
    if mode == "seq_mean_token_sum_norm":
        if not max_len or max_len < 1:
            raise ValueError("seq_mean_token_sum_norm needs max_len, the constant divisor (e.g. the "
                             "maximum answer length)")
        return x.sum() / (x.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")


def policy_log_ratio(logprobs: Tensor, old_logprobs: Tensor, action_mask: Tensor,
                     level: str = "token") -> Tensor:
    """log(pi / pi_old) per answer token, clamped to +-LOG_RATIO_CLAMP; 0 off the mask.

    Shapes: ``[batch, response_len]`` -> ``[batch, response_len]``.

        token     d_t = logprobs_t - old_logprobs_t
        sequence  d_t = 1/n_i sum_s mask_is (logprobs_is - old_logprobs_is)   for every t of row i
                  (GSPO, Zheng et al. 2025: s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|); the gradient
                  flows to every token of the answer through the mean)

    Masked entries are zeroed before any arithmetic, so -inf log-probs on padding give neither
    inf nor nan gradients. The clamp keeps one collapsed token (log-ratio -100 in bf16) from
    giving an inf ratio; beyond it the clip has long acted anyway.
    """
    d = _masked(logprobs - old_logprobs, action_mask)
    if level == "sequence":
        n = action_mask.to(d.dtype).sum(dim=1, keepdim=True).clamp(min=1)
        d = _masked((d.sum(dim=1, keepdim=True) / n).expand_as(d), action_mask)
    elif level != "token":
        raise ValueError(f"unknown ratio level {level!r}; choose one of {', '.join(RATIO_LEVELS)}")
    return d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    max_len: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss, with optional KL-to-reference term.

    Shapes: ``logprobs`` (current policy, with grad), ``old_logprobs`` (the rollout's),
    ``advantages``, ``action_mask``, ``ref_logprobs``: ``[batch, response_len]`` ->
    ``(loss 0-dim, stats)``.

        ratio_t = exp(policy_log_ratio(...))                       (token or sequence level)
        l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
        loss    = aggregate(l) + kl_coef * aggregate(kl_t(logprobs, ref_logprobs))

    ``clip_high`` defaults to ``clip_low`` (PPO's symmetric clip). The KL term is added only
    when ``kl_coef > 0`` and ``ref_logprobs`` is given.

    Stats (token-level masked means over the batch, detached):
    ``clipfrac`` (the clipped branch was chosen strictly: there the gradient is 0), split into
    ``clipfrac_low`` (ratio below 1 - clip_low, A < 0) and ``clipfrac_high`` (ratio above
    1 + clip_high, A > 0); ``approx_kl`` = mean(0.5 * log_ratio^2) (k2 of KL(old || new));
    ``ratio_mean``; ``pg_loss`` (the loss without the KL term) and, with the KL term, ``kl``
    (the aggregated estimate).
    """
    clip_high = clip_low if clip_high is None else clip_high
    mask = action_mask
    log_ratio = policy_log_ratio(logprobs, old_logprobs, mask, ratio_level)
    ratio = torch.exp(log_ratio)
    adv = _masked(advantages, mask).to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = aggregate_loss(torch.maximum(unclipped, clipped), mask, aggregation, max_len)
    loss = pg
    kl = None
    if kl_coef and ref_logprobs is not None:
        # both masked first: a -inf log-prob on padding must not reach exp() (nan gradients)
        kl_t = kl_penalty(_masked(logprobs, mask), _masked(ref_logprobs, mask).to(logprobs.dtype),
                          kl_estimator)
        kl = aggregate_loss(kl_t, mask, aggregation, max_len)
        loss = pg + kl_coef * kl
    with torch.no_grad():
        chosen = clipped > unclipped
        stats = {
            "clipfrac": masked_mean(chosen.to(ratio.dtype), mask),
            "clipfrac_low": masked_mean((chosen & (ratio < 1.0 - clip_low)).to(ratio.dtype), mask),
            "clipfrac_high": masked_mean((chosen & (ratio > 1.0 + clip_high)).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "pg_loss": pg.detach(),
        }
        if kl is not None:
            stats["kl"] = kl.detach()
    return loss, stats
