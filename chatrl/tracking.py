"""Experiment trackers beside the JSONL log: `--report-to tensorboard,wandb,jsonl`.

`metrics.jsonl` is always written (reports, resume and tests read it); `jsonl` may be named for
clarity. `tensorboard` writes <output_dir>/tensorboard (also governed by DeepSpeed-Chat's
--enable-tensorboard). `wandb` (Weights & Biases, an optional dependency: `pip install wandb`)
gets the same rows as the JSONL log: each metric as `<kind>/<name>` (`train/loss/actor`,
`eval/accuracy`; a name that already starts with its kind keeps it: `eval/loss`) against the
optimizer step, plus the run's resolved config; `WANDB_MODE=offline` writes the run under
<output_dir>/wandb for a later `wandb sync`. Rank 0 only, like the log.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "jsonl")


def parse_report_to(value) -> set[str]:
    """'tensorboard,wandb' (or a list) -> {'tensorboard', 'wandb'}; 'none' -> set()."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = {str(v).strip().lower() for v in items if str(v).strip()}
    if names == {"none"}:
        return set()
    unknown = names - set(TRACKERS)
    if unknown:
        raise ConfigError(f"--report-to {value!r} names {', '.join(sorted(unknown))}; use a comma-separated "
                          f"list of {', '.join(TRACKERS)} (or none), e.g. --report-to tensorboard,wandb")
    return names


def check_report_to(value) -> None:
    """Validate the flag, and that wandb is importable when asked for (before weights load)."""
    if "wandb" in parse_report_to(value):
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError("--report-to wandb needs the wandb package, which is not installed; "
                              "pip install wandb (or drop wandb from --report-to)") from e


class WandbTracker:
    """One W&B run per step run; metrics stepped by `step` (a custom x-axis, so eval rows and a
    resumed run's repeated steps are kept, not dropped as out of order)."""

    def __init__(self, out_dir: Path, step_name: str, config: dict, project: str | None = None):
        import wandb

        self.wandb = wandb
        run_name = f"{Path(out_dir).resolve().name}-{step_name}"
        self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "chatrl",
                              name=run_name, dir=str(out_dir), config=config, job_type=step_name,
                              reinit="finish_previous")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict, kind: str) -> None:
        row = {k if k.startswith(f"{kind}/") else f"{kind}/{k}": v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if row:
            self.run.log({"step": step, **row})

    def close(self) -> None:
        self.run.finish()


def open_trackers(report_to, out_dir: str | Path, step_name: str, config=None,
                  project: str | None = None) -> list:
    """The trackers besides JSONL and TensorBoard (which MetricsLogger writes itself)."""
    trackers = []
    if "wandb" in parse_report_to(report_to):
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
        trackers.append(WandbTracker(Path(out_dir), step_name, cfg, project))
    return trackers
