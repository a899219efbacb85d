"""The named online algorithms as presets of orthogonal choices.

Every algorithm of step 3 is the same loop (rollout -> score -> advantages -> update) with these
choices; a named algorithm only fills in the ones the user did not set:

    estimator   gae | grpo | rloo | reinforce_pp         (advantages.py, gae.py)
    scale_std   GRPO's division of the group advantage by the group's std
    aggregation token_mean | seq_mean_token_mean | seq_mean_token_sum_norm   (policy.py)
    ratio       token | sequence (GSPO)
    clip        clip_low, clip_high (DAPO raises clip_high)
    kl          placement none | reward | loss, coefficient, estimator k1 | k2 | k3
    whiten      whiten the advantages over the update, all ranks (PPO; REINFORCE++'s global
                batch normalisation)
    dynamic     DAPO's dynamic sampling (drop groups whose rewards are all equal, refill)
    overlong    DAPO's soft over-long penalty buffer (tokens; 0 = off)

Sources of the defaults: PPO as in DeepSpeed-Chat/InstructGPT; GRPO (Shao et al. 2024) with
TRL's current default of no KL; Dr. GRPO (Liu et al. 2025); DAPO (Yu et al. 2025: clip 0.2/0.28,
token mean, dynamic sampling, over-long shaping, no KL); GSPO (Zheng et al. 2025: sequence
ratio, clip 3e-4/4e-4); RLOO (Ahmadian et al. 2024: KL in the reward); REINFORCE++ (Hu 2025:
per-token KL in the reward, returns whitened over the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from chatrl.rl.advantages import ADVANTAGE_ESTIMATORS
from chatrl.rl.kl import KL_ESTIMATORS
from chatrl.rl.policy import LOSS_AGGREGATIONS, RATIO_LEVELS

__all__ = ["ALGORITHMS", "KL_PLACEMENTS", "AlgoSettings", "resolve_algorithm"]

KL_PLACEMENTS = ("none", "reward", "loss")


@dataclass(frozen=True)
class AlgoSettings:
    name: str
    estimator: str
    scale_std: bool
    aggregation: str
    ratio_level: str
    clip_low: float
    clip_high: float
    kl_placement: str
    kl_coef: float
    kl_estimator: str
    whiten: bool
    dynamic_sampling: bool
    overlong_buffer: int
    num_generations: int

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    @property
    def group_baseline(self) -> bool:
        return self.estimator in ("grpo", "rloo")

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_placement == "reward"

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_placement == "loss" and self.kl_coef > 0

    def check(self) -> None:
        """ValueError naming the first inconsistent choice (the caller adds the flag names)."""
        for name, value, allowed in (("estimator", self.estimator, ADVANTAGE_ESTIMATORS),
                                     ("aggregation", self.aggregation, LOSS_AGGREGATIONS),
                                     ("ratio_level", self.ratio_level, RATIO_LEVELS),
                                     ("kl_placement", self.kl_placement, KL_PLACEMENTS),
                                     ("kl_estimator", self.kl_estimator, KL_ESTIMATORS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.group_baseline and self.num_generations < 2:
            raise ValueError(f"the {self.estimator} estimator compares the answers to one prompt, so "
                             f"it needs num_generations >= 2 (got {self.num_generations})")
        if self.dynamic_sampling and self.num_generations < 2:
            raise ValueError("dynamic sampling drops groups whose answers all scored the same, so "
                             f"it needs num_generations >= 2 (got {self.num_generations})")
        if not (0 < self.clip_low < 1) or self.clip_high <= 0:
            raise ValueError(f"clip_low must be in (0, 1) and clip_high > 0; got {self.clip_low}, "
                             f"{self.clip_high}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0; got {self.kl_coef}")


_PPO = AlgoSettings(name="ppo", estimator="gae", scale_std=False, aggregation="token_mean",
                    ratio_level="token", clip_low=0.2, clip_high=0.2, kl_placement="reward",
                    kl_coef=0.1, kl_estimator="k1", whiten=True, dynamic_sampling=False,
                    overlong_buffer=0, num_generations=1)
_GRPO = replace(_PPO, name="grpo", estimator="grpo", scale_std=True,
                aggregation="seq_mean_token_mean", kl_placement="loss", kl_coef=0.0,
                kl_estimator="k3", whiten=False, num_generations=8)

ALGORITHMS: dict[str, AlgoSettings] = {
    "ppo": _PPO,
    "grpo": _GRPO,
    "dr_grpo": replace(_GRPO, name="dr_grpo", scale_std=False, aggregation="seq_mean_token_sum_norm"),
    "dapo": replace(_GRPO, name="dapo", aggregation="token_mean", clip_high=0.28,
                    dynamic_sampling=True, overlong_buffer=-1),  # -1: a quarter of the max length
    "gspo": replace(_GRPO, name="gspo", ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
    "rloo": replace(_GRPO, name="rloo", estimator="rloo", scale_std=False, aggregation="token_mean",
                    kl_placement="reward", kl_coef=0.05, kl_estimator="k1", num_generations=4),
    "reinforce_pp": replace(_GRPO, name="reinforce_pp", estimator="reinforce_pp", scale_std=False,
                            aggregation="token_mean", kl_placement="reward", kl_coef=0.01,
                            kl_estimator="k1", whiten=True, num_generations=4),
}


def resolve_algorithm(name: str, max_answer_len: int | None = None, **overrides) -> AlgoSettings:
    """The preset `name` with every override that is not None applied, checked.

    ``overrides`` are AlgoSettings field names. The DAPO over-long buffer default (-1) becomes a
    quarter of ``max_answer_len``. Raises ValueError for an unknown name or an inconsistent mix.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    known = {f.name for f in fields(AlgoSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown algorithm settings {sorted(unknown)}")
    settings = replace(ALGORITHMS[name], **{k: v for k, v in overrides.items() if v is not None})
    if settings.overlong_buffer < 0:
        settings = replace(settings, overlong_buffer=max((max_answer_len or 0) // 4, 0))
    settings.check()
    return settings
