"""Per-step data: DeepSpeed-Chat's `--data-split`, blending several sources, optional weights.

`data_split "2,4,4"`: each source's train rows are shuffled with the seed and cut into three
disjoint contiguous slices in the proportions 2:4:4 (normalised); step 1 (SFT) takes slice 0,
step 2 (reward model) slice 1, step 3 (PPO) slice 2. The eval rows are cut the same way. So the
three steps never train on the same rows, and every step of a run sees the same cut.

Several sources are blended: each one's slice is scaled by its weight (2.0 = its rows twice,
0.5 = a seeded half), then all are concatenated and shuffled with the seed. Weights scale the
train rows only; eval rows stay as they are, so eval measures every source's held-out data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from datasets import Dataset, concatenate_datasets

from ..errors import ConfigError, DataError
from .sources import SourceData, load_source, rows_to_dataset

STEP_NAMES = {1: "step 1 (SFT)", 2: "step 2 (reward model)", 3: "step 3 (PPO)"}


@dataclass
class StepData:
    """The rows one step trains and evaluates on, in the unified schema.

    Step 3 keeps only the `messages` column (the prompts). stats: {"step", "data_split",
    "train_rows", "eval_rows", "sources": {spec: {rows_in, rows_kept, skipped_rows, ...,
    train_rows, eval_rows (this step's slice), weight, used}}}.
    """

    train: Dataset
    eval: Dataset
    stats: dict = field(default_factory=dict)


def parse_data_split(data_split: str | Sequence[float]) -> tuple[float, float, float]:
    """"2,4,4" -> (0.2, 0.4, 0.4); ConfigError for anything but 3 non-negative numbers with a
    positive sum."""
    text = data_split if isinstance(data_split, str) else ",".join(str(x) for x in data_split)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ConfigError(f'--data-split "{text}" has {len(parts)} part{"s" * (len(parts) != 1)}; '
                          'it needs 3 (one share per step), e.g. "2,4,4"')
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f'--data-split "{text}" holds something that is not a number; it needs 3 '
                          'comma-separated numbers, e.g. "2,4,4"') from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f'--data-split "{text}" has a negative or infinite share; use 3 '
                          'non-negative numbers, e.g. "2,4,4"')
    total = sum(values)
    if total <= 0:
        raise ConfigError(f'--data-split "{text}" gives no step any data (the shares sum to 0); '
                          'e.g. "2,4,4"')
    return tuple(v / total for v in values)  # type: ignore[return-value]


def slice_bounds(n: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """[start, end) of each slice of n rows: boundaries at round(cumulative share * n), so the
    slices are disjoint, contiguous and cover all n rows."""
    bounds, acc, start = [], 0.0, 0
    for frac in fractions:
        acc += frac
        end = min(n, int(round(acc * n)))
        bounds.append((start, end))
        start = end
    bounds[-1] = (bounds[-1][0], n)
    return bounds


def step_indices(n: int, fractions: Sequence[float], step: int, seed: int) -> list[int]:
    """Row indices of `step`'s slice of n rows shuffled with `seed` (in shuffled order)."""
    perm = np.random.default_rng(seed).permutation(n)
    start, end = slice_bounds(n, fractions)[step - 1]
    return perm[start:end].tolist()


def scale_indices(n: int, weight: float, seed: int) -> list[int]:
    """Indices 0..n-1 scaled to about round(weight * n) rows, deterministic given seed.

    Whole copies for the integer part of the weight, then a seeded sample without replacement
    for the fraction: 2.0 -> every row twice, 0.5 -> a seeded half, 1.5 -> all + a half.
    """
    whole = int(math.floor(weight))
    extra = int(round((weight - whole) * n))
    idx = list(range(n)) * whole
    if extra:
        idx += sorted(np.random.default_rng(seed).choice(n, size=extra, replace=False).tolist())
    return idx


def _check_weights(weights: Sequence[float] | None, data_path: Sequence[str]) -> list[float]:
    if weights is None:
        return [1.0] * len(data_path)
    weights = list(weights)
    if len(weights) != len(data_path):
        raise ConfigError(f"--data-weights has {len(weights)} value(s) but --data-path has "
                          f"{len(data_path)} source(s) ({', '.join(data_path)}); give one weight "
                          "per source, e.g. --data-weights " + " ".join(["1.0"] * len(data_path)))
    for spec, w in zip(data_path, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"--data-weights: the weight {w!r} for {spec} is not a positive number; "
                              "use e.g. 1.0 (as is), 2.0 (twice as many rows) or 0.5 (half); "
                              "drop the source from --data-path to leave it out")
    return [float(w) for w in weights]


def _blend(parts: list[Dataset], seed: int) -> Dataset:
    """Concatenate and shuffle with the seed (an empty blend keeps the unified schema)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return rows_to_dataset([])
    ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    perm = np.random.default_rng(seed).permutation(len(ds)).tolist()
    return ds.select(perm)


def _pairs_only(ds: Dataset) -> tuple[Dataset, int]:
    keep = [i for i, r in enumerate(ds["rejected"]) if r is not None]
    return (ds if len(keep) == len(ds) else ds.select(keep)), len(ds) - len(keep)


def build_step_data(data_path: Sequence[str], data_split: str, step: int, *, seed: int = 1234,
                    sft_only_data_path: Sequence[str] = (), weights: Sequence[float] | None = None,
                    skip_bad_rows: bool = False) -> StepData:
    """The blended train/eval rows of one step (1, 2 or 3) from `data_path` (see module docstring).

    sft_only_data_path sources go wholly (no split) to step 1 and are ignored by steps 2 and 3.
    Step 2 uses the pairwise sources only (rows without a rejected answer are dropped and
    counted); step 3 keeps only the prompts (`messages`).
    """
    if step not in STEP_NAMES:
        raise ConfigError(f"step {step!r} is not a training step; use 1 (SFT), 2 (reward model) "
                          "or 3 (PPO)")
    data_path = [data_path] if isinstance(data_path, str) else list(data_path)
    sft_only = [sft_only_data_path] if isinstance(sft_only_data_path, str) else list(sft_only_data_path)
    if not data_path and not (step == 1 and sft_only):
        raise ConfigError(f"{STEP_NAMES[step]} has no data: --data-path is empty; pass a named "
                          "dataset, 'demo' or a local file")
    fractions = parse_data_split(data_split)
    share = fractions[step - 1]
    if share <= 0 and not (step == 1 and sft_only):
        raise ConfigError(f'--data-split "{data_split}" gives {STEP_NAMES[step]} a share of 0, so '
                          f'it would get no data; give step {step} a positive share, e.g. "2,4,4"')
    weights_ = _check_weights(weights, data_path)

    sources: list[tuple[SourceData, float]] = [
        (load_source(spec, seed=seed, skip_bad_rows=skip_bad_rows), w)
        for spec, w in zip(data_path, weights_)]
    if step == 2 and not any(sd.pairwise for sd, _ in sources):
        raise DataError(f"{STEP_NAMES[step]} needs pairwise data (a chosen and a rejected answer "
                        f"per prompt) but none of --data-path {', '.join(data_path)} has rejected "
                        "answers; add a pairwise source such as Dahoas/rm-static, 'demo', or a file "
                        "with a `rejected` column")

    stats: dict = {"step": step, "data_split": list(fractions), "sources": {}}
    train_parts, eval_parts = [], []
    for k, (sd, weight) in enumerate(sources):
        info = dict(sd.stats, weight=weight)
        key = sd.name if sd.name not in stats["sources"] else f"{sd.name}#{k + 1}"
        stats["sources"][key] = info
        if step == 2 and not sd.pairwise:
            info.update(used=False, reason="not pairwise (no rejected answers)",
                        train_rows=0, eval_rows=0)
            continue
        # The cut depends only on the source's rows and the seed, so steps 1, 2 and 3 of a run
        # (separate processes) take disjoint slices of the same shuffled order.
        train = sd.train.select(step_indices(len(sd.train), fractions, step, seed))
        eval_ = sd.eval.select(step_indices(len(sd.eval), fractions, step, seed))
        if step == 2:
            train, dropped_t = _pairs_only(train)
            eval_, dropped_e = _pairs_only(eval_)
            info["dropped_no_rejected"] = dropped_t + dropped_e
        train = train.select(scale_indices(len(train), weight, seed + k)) if weight != 1.0 else train
        info.update(used=True, train_rows=len(train), eval_rows=len(eval_))
        train_parts.append(train)
        eval_parts.append(eval_)
    if step == 1:
        for spec in sft_only:
            sd = load_source(spec, seed=seed, skip_bad_rows=skip_bad_rows)
            key = sd.name if sd.name not in stats["sources"] else f"{sd.name}#sft"
            stats["sources"][key] = dict(sd.stats, weight=1.0, used=True, sft_only=True)
            train_parts.append(sd.train)
            eval_parts.append(sd.eval)

    train, eval_ = _blend(train_parts, seed), _blend(eval_parts, seed)
    if step == 3:
        train = train.select_columns(["messages"])
        eval_ = eval_.select_columns(["messages"])
    if len(train) == 0:
        raise DataError(f"{STEP_NAMES[step]} got no training rows from {', '.join(data_path + sft_only)} "
                        f'with --data-split "{data_split}"; use more data or a larger share for '
                        f"step {step}")
    stats.update(train_rows=len(train), eval_rows=len(eval_))
    return StepData(train=train, eval=eval_, stats=stats)
