"""Pure RLHF math: masks, log-probs, KL rewards, GAE and critic-free advantages (GRPO, RLOO,
REINFORCE++), whitening, the clipped policy objective and its variants, PPO/value/pairwise/DPO
losses, dynamic sampling and pass@k, the algorithm presets, EMA.

Shapes follow one vocabulary: ``[batch, response_len]`` for per-token
tensors (logprobs, ref_logprobs, values, rewards, advantages, returns,
action_mask) and ``[batch]`` for per-sequence ones (scores). No function here
reads a config or touches a model.
"""

from chatrl.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    group_advantages,
    kl_penalized_scores,
    rloo_advantages,
    sequence_to_tokens,
)
from chatrl.rl.algorithms import ALGORITHMS, KL_PLACEMENTS, AlgoSettings, resolve_algorithm
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
    next_token_logprobs,
    sequence_logprobs,
    sft_loss,
    token_counts,
)
from chatrl.rl.groups import informative_groups, overlong_penalty, pass_at_k
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
from chatrl.rl.policy import (
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    aggregate_loss,
    clipped_policy_loss,
    policy_log_ratio,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ALGORITHMS",
    "KL_PLACEMENTS",
    "LOSS_AGGREGATIONS",
    "RATIO_LEVELS",
    "AlgoSettings",
    "aggregate_loss",
    "clipped_policy_loss",
    "discounted_returns",
    "group_advantages",
    "informative_groups",
    "kl_penalized_scores",
    "overlong_penalty",
    "pass_at_k",
    "policy_log_ratio",
    "resolve_algorithm",
    "rloo_advantages",
    "sequence_to_tokens",
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
    "next_token_logprobs",
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
