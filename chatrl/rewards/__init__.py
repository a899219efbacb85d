"""Reward sources of online RL, combinable with weights, each scored and logged on its own.

A source scores the answers of one rollout batch (on the rank that generated them):

    FunctionReward   a Python function with TRL's GRPO signature
                     fn(prompts, completions, **columns) -> list[float]
                     (columns = the prompt dataset's other fields, one list entry per answer);
                     from "path/to/file.py:name" or "package.module:name"
    built-in verifiers (verifiers.py): math (answer equivalence via math-verify), exact, numeric,
                     format (a regex)
    RewardModelSource a reward model folder from `chatrl rm`: its score at the answer's EOS
    RemoteReward     an HTTP server: POST {"prompts", "completions", "columns"} -> {"rewards"}

`score_batch` calls every source, checks what comes back (a list of finite numbers, one per
answer) and sums the weighted scores. A bad value (the function raised, returned the wrong
length, a NaN or something not a number) stops the run with a one-line RewardError naming the
source and the sample, or, with skip_bad, scores that sample 0 for that source and counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from ..errors import ChatRLError

__all__ = ["RewardError", "ScoringBatch", "RewardSource", "Scores", "score_batch", "short"]


class RewardError(ChatRLError):
    """A reward source failed or returned something unusable."""


def short(x: Any, limit: int = 60) -> str:
    """A value shortened for a one-line message."""
    if isinstance(x, list) and x and isinstance(x[-1], dict) and "content" in x[-1]:
        x = x[-1]["content"]
    text = repr(x)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


@dataclass
class ScoringBatch:
    """The answers of one rollout batch, in the forms sources want (one entry per answer).

    prompts / completions: TRL's forms — plain strings for a text prompt; for a chat prompt the
    messages and [{"role": "assistant", "content": answer}]. texts: the answers as plain text.
    columns: the prompt data's other fields, {name: [value per answer]}. sequences /
    attention_mask: prompt + answer token ids [B, P + R] for reward models.
    """
    prompts: list
    completions: list
    texts: list[str]
    columns: dict[str, list] = field(default_factory=dict)
    completion_ids: list[list[int]] = field(default_factory=list)
    sequences: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    # the prompt's width in `sequences` where rows repeat prompts (G answers each; None where
    # they do not): a reward model then forwards each distinct prompt once
    shared_prompt_len: int | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "ScoringBatch":
        """The answers `idx` only (text fields; no tensors)."""
        return ScoringBatch(prompts=[self.prompts[i] for i in idx],
                            completions=[self.completions[i] for i in idx],
                            texts=[self.texts[i] for i in idx],
                            columns={k: [v[i] for i in idx] for k, v in self.columns.items()},
                            completion_ids=[self.completion_ids[i] for i in idx]
                            if self.completion_ids else [])


class RewardSource(Protocol):
    name: str
    # True for verifiers whose 1.0 means "correct": their mean is logged as reward/accuracy
    is_correctness: bool

    def __call__(self, batch: ScoringBatch) -> Sequence[float] | torch.Tensor: ...


@dataclass
class Scores:
    """per_source: {name: [B] raw scores}; total: [B] = sum of weight x score; bad: {name: count
    of samples scored 0 by skip_bad}; accuracy: [B] of the first correctness verifier, if any."""
    per_source: dict[str, torch.Tensor]
    total: torch.Tensor
    bad: dict[str, int]
    accuracy: torch.Tensor | None = None


def _as_floats(values, n: int, name: str, batch: ScoringBatch, skip_bad: bool) -> tuple[list[float], int]:
    """Check one source's output; returns (floats, number of samples zeroed)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        values = None
    if values is None or len(values) != n:
        got = "something that is not a list" if values is None else f"{len(values)} values"
        if skip_bad:
            return [0.0] * n, n
        raise RewardError(f"reward {name} returned {got} for {n} completions (first prompt "
                          f"{short(batch.prompts[0] if batch.prompts else None)}); it must return "
                          "one number per completion (or pass --skip-bad-rewards)")
    out, bad = [], 0
    for i, v in enumerate(values):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            if not skip_bad:
                raise RewardError(f"reward {name} returned {v!r} for sample {i} (prompt "
                                  f"{short(batch.prompts[i])}, completion {short(batch.texts[i])}); "
                                  "rewards must be finite numbers (or pass --skip-bad-rewards to "
                                  "score such samples 0)")
            v, bad = 0.0, bad + 1
        out.append(float(v))
    return out, bad


def _call(source, batch: ScoringBatch, skip_bad: bool) -> tuple[list[float], int]:
    """Call a source; if it raises, find the sample it fails on (one call per sample)."""
    n = len(batch)
    try:
        return _as_floats(source(batch), n, source.name, batch, skip_bad)
    except RewardError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - a user function may raise anything
        if getattr(source, "per_sample_retry", True) is False:
            if skip_bad:
                return [0.0] * n, n
            raise RewardError(f"reward {source.name} failed: {type(batch_error).__name__}: "
                              f"{batch_error}") from batch_error
        out, bad = [], 0
        for i in range(n):
            one = batch.subset([i])
            try:
                vals, b = _as_floats(source(one), 1, source.name, one, skip_bad)
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001
                if not skip_bad:
                    raise RewardError(
                        f"reward {source.name} raised {type(e).__name__}: {e} on sample {i} (prompt "
                        f"{short(batch.prompts[i])}, completion {short(batch.texts[i])}); fix it "
                        "or pass --skip-bad-rewards to score such samples 0") from e
                vals, b = [0.0], 1
            out += vals
            bad += b
        if bad == 0 and not skip_bad:
            raise RewardError(f"reward {source.name} raised {type(batch_error).__name__}: "
                              f"{batch_error} on a batch of {n} completions, but not on any one "
                              "of them alone") from batch_error
        return out, bad


def score_batch(sources: Sequence, weights: Sequence[float], batch: ScoringBatch,
                skip_bad: bool = False, device=None) -> Scores:
    """Score `batch` with every source; total = sum of weight x score (see the module docstring)."""
    per_source, bad, accuracy = {}, {}, None
    total = torch.zeros(len(batch), dtype=torch.float32)
    for source, weight in zip(sources, weights):
        vals, n_bad = _call(source, batch, skip_bad)
        t = torch.tensor(vals, dtype=torch.float32)
        per_source[source.name] = t
        bad[source.name] = n_bad
        total = total + float(weight) * t
        if accuracy is None and getattr(source, "is_correctness", False):
            accuracy = (t > 0.5).float()
    if device is not None:
        total = total.to(device)
    return Scores(per_source=per_source, total=total, bad=bad, accuracy=accuracy)
