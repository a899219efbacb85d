"""Critic-free advantage estimators: GRPO's group baseline, RLOO's leave-one-out baseline and
REINFORCE++'s discounted returns (whitened over the global batch by the caller), plus the
helpers they share. GAE (with a critic) lives in gae.py.

Groups: a rollout samples ``G`` answers per prompt and lays them out consecutively, so rows
``g*G .. g*G + G-1`` of a ``[batch]`` tensor are the answers to prompt ``g`` (``batch`` is a
multiple of ``G``). A group never spans two ranks or two rollout batches, so the group
baselines need no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatrl.rl.masks import _masked

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "group_view",
    "group_advantages",
    "rloo_advantages",
    "discounted_returns",
    "sequence_to_tokens",
    "kl_penalized_scores",
]

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")


def group_view(scores: Tensor, group_size: int) -> Tensor:
    """``[batch]`` -> ``[batch / G, G]``, one row per prompt (ValueError if G does not divide)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [batch]; got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024): each answer's score against its group's mean.

    Shapes: ``scores`` ``[batch]`` (batch = n_prompts x G) -> ``[batch]`` fp32.

        A_i = r_i - mean_g(r)                           (scale_by_std=False: Dr. GRPO)
        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      (scale_by_std=True: GRPO)

    ``std_g`` is the unbiased standard deviation of the G scores of the group (as TRL). A group
    whose scores are all equal gets A = 0 for every answer (it carries no signal). G must be at
    least 2 (one answer has no group to compare with).
    """
    if group_size < 2:
        raise ValueError(f"a group baseline needs at least 2 answers per prompt; got {group_size}")
    g = group_view(scores.detach().float(), group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each answer's score
    against the mean of the OTHER answers to the same prompt.

    Shapes: ``scores`` ``[batch]`` -> ``[batch]`` fp32.

        A_i = r_i - (sum_g(r) - r_i) / (G - 1)  =  G / (G - 1) * (r_i - mean_g(r))

    A group whose scores are all equal gets 0. G must be at least 2.
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 answers per prompt; got {group_size}")
    g = group_view(scores.detach().float(), group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def discounted_returns(rewards: Tensor, action_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Per-token returns of REINFORCE(++): the discounted sum of this and later token rewards.

    Shapes: ``rewards``, ``action_mask``: ``[batch, response_len]`` -> ``[batch, response_len]``.

        G_t = r_t + gamma * G_{t+1}          (G = 0 after the last masked token)

    Masked entries (padding, after the EOS) are 0 in the output and never enter the sum.
    REINFORCE++ (Hu 2025) uses G_t as the advantage after whitening it over all tokens of the
    global batch (the caller's job: it spans rollout batches and ranks).
    """
    with torch.no_grad():
        mask = action_mask.float()
        r = _masked(rewards.float(), mask)
        out = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            running = (r[:, t] + gamma * running) * mask[:, t]
            out[:, t] = running
    return out


def sequence_to_tokens(advantages: Tensor, action_mask: Tensor) -> Tensor:
    """One advantage per answer, given to each of its tokens: ``[batch]`` -> ``[batch, R]``,
    0 off the mask."""
    return _masked(advantages.float().unsqueeze(1).expand_as(action_mask), action_mask)


def kl_penalized_scores(scores: Tensor, kl: Tensor, action_mask: Tensor, kl_coef: float) -> Tensor:
    """KL in the reward for sequence-level estimators: the score minus the answer's summed KL.

    Shapes: ``scores`` ``[batch]``, ``kl`` (per-token estimate, see kl_penalty), ``action_mask``
    ``[batch, R]`` -> ``[batch]``.

        r_i = score_i - kl_coef * sum_t mask_t * kl_t
    """
    return scores.float() - kl_coef * _masked(kl.float(), action_mask).sum(dim=1)
