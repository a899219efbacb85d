"""Guards of finished work: a step stops before it saves or publishes something wrong.

A non-finite loss, gradient or weight stops the step before anything is logged or saved: the
last checkpoint stays the last good one, no model is published, the step stays unfinished (so
`chatrl train` does not build the next step on it). A gradient that is not finite makes the
weights non-finite, or at least their outputs (weights of ~1e30 are finite, their forward is
not): so before every checkpoint and before the final save the weights and the outputs of a
forward pass on the last batch are checked too. PPO's critic and reward model must come with a
trained value head.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from ..engine import checkpoint as ckpt
from ..engine import ds
from ..errors import ModelError, TrainingDiverged
from ..logging import write_line

if TYPE_CHECKING:
    from .common import Run


def _advice(run: Run) -> str:
    cfg = run.cfg
    lr = (f"--actor-learning-rate {cfg.actor_learning_rate:g} / --critic-learning-rate "
          f"{cfg.critic_learning_rate:g}" if hasattr(cfg, "actor_learning_rate")
          else f"--learning-rate {cfg.learning_rate:g}")
    clip = (f"--max-grad-norm {cfg.max_grad_norm:g}" if cfg.max_grad_norm else
            "--max-grad-norm, now 0 = off")
    return (f"nothing of it was saved and no model was published. Lower {lr}, clip gradients "
            f"({clip}) or check the data, then {ckpt.resume_hint(run.ckpt_dir)}")


def _diverged(run: Run, where: str, what: str) -> TrainingDiverged:
    return TrainingDiverged(f"{run.name} {where}: {what} not finite: training diverged; "
                            + _advice(run))


def guard_metrics(run: Run, where: str, metrics: dict) -> None:
    """Raise TrainingDiverged if a logged value (losses, scores...) is NaN or infinite."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in list(bad.items())[:4])
        raise _diverged(run, where, f"{shown} {'is' if len(bad) == 1 else 'are'}")


def _all_finite(tensors) -> torch.Tensor:
    flags = [torch.isfinite(t).all() for t in tensors if t.numel() and t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def checkpoint_guard(run: Run, where: str, engines: dict, probe: Callable[[], dict] | None = None) -> None:
    """Before a checkpoint: the weights and outputs are finite (guard_weights), and the run's
    record holds its resume settings (written at the first checkpoint, so a run that fails before
    one leaves no checkpoints folder)."""
    guard_weights(run, where, engines, probe)
    if ds.is_main():
        ckpt.ensure_record(run.ckpt_dir, run.settings)


def guard_weights(run: Run, where: str, engines: dict, probe: Callable[[], dict] | None = None) -> None:
    """Collective. Raise TrainingDiverged unless every weight of `engines` (this rank's ZeRO
    partition) and every tensor `probe()` returns are finite."""
    bad = []
    for name, engine in engines.items():
        params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
        if not bool(_all_finite(p.detach() for p in params)):
            bad.append(f"the {name} weights")
    if probe is not None and not bad:
        with torch.no_grad():
            outputs = probe()
        bad += [f"the {k} after the update" for k, t in outputs.items() if not bool(_all_finite([t]))]
    if ds.all_reduce_sum(torch.tensor([float(len(bad))])).item():
        raise _diverged(run, where, f"{' and '.join(bad) or 'a value on another rank'} "
                                    f"{'are' if len(bad) != 1 or bad[0].endswith('weights') else 'is'}")


def require_value_heads(paths: dict[str, str], allow_untrained: bool) -> None:
    """PPO's critic and reward model must come with a trained value head (`chatrl rm` output);
    with a random one PPO would optimise noise. Refused unless explicitly allowed."""
    from ..models.reward import RewardModel

    seen = set()
    for role, path in paths.items():
        if RewardModel.is_reward_model(path) or path in seen:
            continue
        seen.add(path)
        if not allow_untrained:
            raise ModelError(f"the {role} {path} has no trained value head (no value_head.safetensors), "
                             "so PPO would train against a random one; pass the output folder of "
                             "`chatrl rm`, or --allow-untrained-reward-head to start from a random "
                             "head anyway")
        write_line(f"warning: the {role} {path} has no trained value head; it starts from a random "
                   "one (--allow-untrained-reward-head)")
