"""Pure RLHF math: masks, log-probs, KL rewards, GAE, whitening, PPO/value/pairwise/DPO losses, EMA.

Shapes follow one vocabulary: ``[batch, response_len]`` for per-token
tensors (logprobs, ref_logprobs, values, rewards, advantages, returns,
action_mask) and ``[batch]`` for per-sequence ones (scores). No function here
reads a config or touches a model.
"""

from chatrl.rl.ema import RunningMoments, ema_update
from chatrl.rl.gae import gae_advantages
from chatrl.rl.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    kl_shaped_rewards,
)
from chatrl.rl.logprobs import (
    IGNORE_INDEX,
    entropy_from_logits,
    gather_logprobs,
    sequence_logprobs,
    sft_loss,
    token_counts,
)
from chatrl.rl.losses import dpo_loss, dschat_pairwise_loss, pairwise_loss, policy_loss, value_loss
from chatrl.rl.masks import (
    last_token_values,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    response_mask,
    whiten,
    whiten_from_moments,
)

__all__ = [
    "IGNORE_INDEX",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "dpo_loss",
    "dschat_pairwise_loss",
    "ema_update",
    "entropy_from_logits",
    "gae_advantages",
    "gather_logprobs",
    "kl_penalty",
    "kl_shaped_rewards",
    "last_token_values",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "pairwise_loss",
    "policy_loss",
    "response_mask",
    "sequence_logprobs",
    "sft_loss",
    "token_counts",
    "value_loss",
    "whiten",
    "whiten_from_moments",
]
