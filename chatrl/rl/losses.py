"""The losses: PPO actor (clipped surrogate), PPO critic (clipped value), reward-model pairwise, DPO.

Token-level means: the PPO losses average over ALL masked tokens of the
batch (``masked_mean`` with ``dim=None``), so every response token weighs the
same and longer responses weigh more, as in DeepSpeed-Chat and InstructGPT's
PPO. Statistics are returned as detached 0-dim tensors (call ``.item()`` when
logging, to avoid a device sync per statistic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from chatrl.rl.masks import _masked, masked_mean
from chatrl.rl.policy import clipped_policy_loss

__all__ = [
    "policy_loss",
    "value_loss",
    "pairwise_loss",
    "dschat_pairwise_loss",
    "dpo_loss",
]


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss for the actor.

    Shapes: ``logprobs`` (current actor, with grad), ``old_logprobs`` (actor at
    rollout time), ``advantages``, ``action_mask``: ``[batch, response_len]``
    -> ``(loss 0-dim, stats)``.

        ratio_t = exp(clamp(logprobs_t - old_logprobs_t, -20, 20))
        loss    = masked_mean( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - c, 1 + c)) )

    Stats (token-level masked means over the batch, detached):

    - ``clipfrac``: share of masked tokens where the clipped term was chosen,
      i.e. ``-A * clip(ratio) > -A * ratio`` strictly (there the gradient is 0);
    - ``approx_kl``: ``masked_mean(0.5 * (logprobs - old_logprobs)^2)``, the k2
      estimator of KL(old || new), as in TRL/OpenAI baselines' PPO2;
    - ``ratio_mean``: ``masked_mean(ratio)``.

    The token-level, symmetric, token-mean case of :func:`chatrl.rl.policy.clipped_policy_loss`
    (whose other stats come along).
    """
    return clipped_policy_loss(logprobs, old_logprobs, advantages, action_mask,
                               clip_low=clip_range, clip_high=clip_range)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped value loss for the critic.

    Shapes: ``values`` (current critic, with grad), ``old_values`` (critic at
    rollout time), ``returns``, ``action_mask``: ``[batch, response_len]``
    -> ``(loss 0-dim, stats)``.

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = 0.5 * masked_mean( max((V - R)^2, (V_clip - R)^2) )

    Stats: ``vf_clipfrac``, the share of masked tokens where the clipped term
    is strictly larger (chosen).
    """
    mask = action_mask
    v = _masked(values, mask)
    v_old = _masked(old_values, mask).to(v.dtype)
    ret = _masked(returns, mask).to(v.dtype)
    v_clipped = torch.maximum(torch.minimum(v, v_old + clip_range), v_old - clip_range)
    unclipped = (v - ret).square()
    clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(v.dtype), mask)}
    return loss, stats


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Reward-model ranking loss (Bradley-Terry), the default of step 2.

    Shapes: ``chosen_scores``, ``rejected_scores``: ``[batch]`` (the reward at
    each sequence's EOS) -> ``(loss 0-dim, accuracy 0-dim)``.

        loss     = mean_b -log sigmoid(c_b - r_b)      (F.logsigmoid: stable)
        accuracy = mean_b [c_b > r_b]                  (ties count as wrong)
    """
    diff = chosen_scores - rejected_scores
    loss = -F.logsigmoid(diff).mean()
    accuracy = (diff.detach() > 0).float().mean()
    return loss, accuracy


def _lengths(ids: Tensor, pad_id: int, num_padding_at_beginning: int) -> Tensor:
    """Right-padded length per row: index of the (k+1)-th pad token, or seq_len if fewer pads."""
    is_pad = (ids == pad_id).long()
    seq_len = ids.shape[-1]
    # position of the (k+1)-th pad = first t where the running pad count exceeds k
    past = is_pad.cumsum(-1) > num_padding_at_beginning
    first = torch.where(past, torch.arange(seq_len, device=ids.device), seq_len)
    return first.min(dim=-1).values


def dschat_pairwise_loss(
    chosen_values: Tensor,
    rejected_values: Tensor,
    chosen_ids: Tensor,
    rejected_ids: Tensor,
    pad_id: int,
    num_padding_at_beginning: int = 0,
    chosen_attention_mask: Tensor | None = None,
    rejected_attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DeepSpeed-Chat's reward loss, the OPTIONAL variant of step 2.

    Shapes: ``chosen_values``, ``rejected_values``: ``[batch, seq_len]`` (the
    value head at every token); ``chosen_ids``, ``rejected_ids``:
    ``[batch, seq_len]``, prompt + response, right-padded with ``pad_id``
    -> ``(loss 0-dim, accuracy 0-dim)``.

    For each pair b, with ``len_c``/``len_r`` the unpadded lengths (the
    position of the first pad, after skipping ``num_padding_at_beginning``
    leading pads as DS-Chat does for OPT; or ``attention_mask.sum()`` when the
    masks are given) and ``d`` the first position where the ids differ:

        tokens_b = [d, max(len_c, len_r))          if the sequences differ
                 = [len_c - 1, len_c)              if identical (last real token)
        loss_b   = mean_{t in tokens_b} -log sigmoid(c_t - r_t)
        loss     = mean_b loss_b

    As in DeepSpeed-Chat the span runs to the end of the LONGER sequence, so it
    includes value-head outputs at the shorter one's padding positions;
    positions past both ends are excluded. One deliberate difference: for
    identical pairs DS-Chat scores the last padded position; we score the
    last real token. ``accuracy`` compares the end scores (the value at each
    sequence's last real token, its EOS): ``mean_b [c_end > r_end]``.
    ``pad_id`` must differ from the EOS id (chatrl's tokenizers ensure it),
    unless attention masks are passed.
    """
    if chosen_values.shape != rejected_values.shape or chosen_ids.shape != rejected_ids.shape:
        raise ValueError(
            "chosen and rejected tensors must have the same [batch, seq_len] shape; got values "
            f"{tuple(chosen_values.shape)} / {tuple(rejected_values.shape)}, ids "
            f"{tuple(chosen_ids.shape)} / {tuple(rejected_ids.shape)}; pad both to one length"
        )
    seq_len = chosen_ids.shape[-1]
    pos = torch.arange(seq_len, device=chosen_ids.device).expand_as(chosen_ids)
    if chosen_attention_mask is not None:
        len_c = chosen_attention_mask.long().sum(-1)
    else:
        len_c = _lengths(chosen_ids, pad_id, num_padding_at_beginning)
    if rejected_attention_mask is not None:
        len_r = rejected_attention_mask.long().sum(-1)
    else:
        len_r = _lengths(rejected_ids, pad_id, num_padding_at_beginning)

    differs = chosen_ids != rejected_ids
    any_diff = differs.any(-1)
    first_diff = torch.where(differs, pos, seq_len).min(-1).values
    start = torch.where(any_diff, first_diff, (len_c - 1).clamp(min=0))
    end = torch.where(any_diff, torch.maximum(len_c, len_r), len_c.clamp(min=1))
    span = (pos >= start.unsqueeze(-1)) & (pos < end.unsqueeze(-1))

    per_token = -F.logsigmoid(chosen_values - rejected_values)
    loss = masked_mean(per_token, span, dim=-1).mean()
    with torch.no_grad():
        c_end = chosen_values.gather(-1, (len_c - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        r_end = rejected_values.gather(-1, (len_r - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        accuracy = (c_end > r_end).float().mean()
    return loss, accuracy


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimisation, sigmoid loss (Rafailov et al. 2023).

    Shapes: the four inputs are sequence log-probs ``[batch]`` (see
    ``sequence_logprobs``) -> ``(loss 0-dim, stats)``.

        h    = (pi_c - pi_r) - (ref_c - ref_r)
        loss = mean_b[ -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h) ]

    ``eps = label_smoothing`` (conservative DPO, Mitchell 2023; 0 = plain DPO).
    Stats (detached, means over the batch): ``chosen_rewards`` =
    mean(beta * (pi_c - ref_c)), ``rejected_rewards`` = mean(beta * (pi_r - ref_r)),
    ``reward_accuracy`` = mean([chosen reward > rejected reward]),
    ``margin`` = mean(chosen reward - rejected reward).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    loss = losses.mean()
    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
        stats = {
            "chosen_rewards": chosen_rewards.mean(),
            "rejected_rewards": rejected_rewards.mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
        }
    return loss, stats
