"""Generalised advantage estimation (Schulman et al. 2016) over response tokens."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gae_advantages"]


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    action_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns by the GAE backward recursion.

    Shapes: ``rewards``, ``values``, ``action_mask``: ``[batch, response_len]``
    -> ``(advantages, returns)``, both ``[batch, response_len]``.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                       (the critic's target)

    computed for t = T-1 .. 0, vectorised over the batch. Beyond the last
    masked token the episode has ended: V and A there are 0 (the step after
    EOS is terminal), so at the last token ``A_T = r_T - V_T``. Both outputs
    are 0 where the mask is 0. The mask must be contiguous from the start of
    the response (as :func:`response_mask` gives); a 0 acts as the episode
    end. Outputs are detached (they are targets), in fp32.
    """
    if not (rewards.shape == values.shape == action_mask.shape):
        raise ValueError(
            "rewards, values and action_mask must have the same [batch, response_len] shape; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(action_mask.shape)}"
        )
    with torch.no_grad():
        mask = action_mask.float()
        # zero (and de-nan) masked entries so padding can never leak into the recursion
        r = torch.where(mask != 0, rewards.float(), 0.0)
        v = torch.where(mask != 0, values.float(), 0.0)
        advantages = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])
        next_adv = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            delta = r[:, t] + gamma * next_value - v[:, t]
            adv_t = (delta + gamma * lam * next_adv) * mask[:, t]
            advantages[:, t] = adv_t
            next_value = v[:, t]
            next_adv = adv_t
        returns = (advantages + v) * mask
    return advantages, returns
