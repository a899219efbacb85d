"""KL estimators, KL-shaped per-token rewards and the KL coefficient controllers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from chatrl.rl.masks import _last_index

__all__ = [
    "KL_ESTIMATORS",
    "kl_penalty",
    "kl_shaped_rewards",
    "FixedKLController",
    "AdaptiveKLController",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(actor || reference) from sampled-token log-probs.

    Shapes: ``logprobs``, ``ref_logprobs``: ``[batch, response_len]`` ->
    ``[batch, response_len]`` (not masked; the caller masks). With
    ``d = logprobs - ref_logprobs`` (tokens sampled from the actor):

        k1  = d                                   unbiased, can be negative
        k2  = 0.5 * d^2                           biased, low variance, >= 0
        k3  = exp(-d) - (-d) - 1                  unbiased, >= 0 (Schulman 2020)
            = exp(ref - logp) - (ref - logp) - 1
        abs = |d|
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        # expm1(x) - x == exp(x) - x - 1, accurate for small x
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def kl_shaped_rewards(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    scores: Tensor,
    action_mask: Tensor,
    kl_coef: float = 0.1,
    clip_reward: float | None = 5.0,
    estimator: str = "k1",
) -> Tensor:
    """Per-token PPO rewards: a KL penalty on every response token plus the score at the end.

    Shapes: ``logprobs``, ``ref_logprobs``, ``action_mask``:
    ``[batch, response_len]``; ``scores``: ``[batch]`` (reward model output)
    -> ``rewards``: ``[batch, response_len]``.

        r_t  = -kl_coef * kl_t * mask_t                 (kl_t from :func:`kl_penalty`)
        r_T += clip(score, -clip_reward, +clip_reward)  T = last masked token of the row

    T is the first EOS, or the last token of a truncated answer. Entries where
    the mask is 0 (padding, after EOS) are 0. A row with an empty mask gets no
    score. ``clip_reward=None`` disables clipping. The result carries no
    gradient (rewards are targets).
    """
    with torch.no_grad():
        kl = kl_penalty(logprobs.float(), ref_logprobs.float(), estimator)
        mask = action_mask.to(kl.dtype)
        rewards = torch.where(mask != 0, -kl_coef * kl * mask, 0.0)
        score = scores.to(rewards.dtype)
        if clip_reward is not None:
            score = score.clamp(-clip_reward, clip_reward)
        last = _last_index(mask)
        has_token = last >= 0
        rewards.scatter_add_(
            -1, last.clamp(min=0).unsqueeze(-1), torch.where(has_token, score, 0.0).unsqueeze(-1)
        )
    return rewards


def _as_float(x: float | Tensor) -> float:
    return float(x.detach().double().mean().item()) if isinstance(x, Tensor) else float(x)


class FixedKLController:
    """A constant KL coefficient (DeepSpeed-Chat's behaviour, default 0.1)."""

    def __init__(self, kl_coef: float = 0.1) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0; got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        mult  = 1 + e * n_steps / horizon
        value = value * mult

    ``current_kl`` is the measured KL in the same units as ``target``; Ziegler
    et al. use the mean over the batch of the per-sequence KL (the sum of
    ``logprobs - ref_logprobs`` over response tokens), target 6 nats and
    horizon 10000 samples; ``n_steps`` is then the number of samples (batch
    size) since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0; got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"the adaptive KL target must be > 0; got {target}")
        if horizon <= 0:
            raise ValueError(f"the adaptive KL horizon must be > 0; got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Move the coefficient towards the target KL (a tensor is averaged); returns the new value."""
        error = min(max(_as_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
