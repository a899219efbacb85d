"""One metrics logger (console, JSONL, TensorBoard), rank 0 only, and progress bars with ETA.

Metric names are namespaced: `loss/actor`, `reward/score`, `policy/kl`, `time/generate`,
`perf/tokens_per_s`... Every training row also has `memory/peak_rss_gb`: rank 0's peak resident
memory since the previous training row (the whole step before the first). The JSONL file (`metrics.jsonl`) is what reports and tests read.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .engine import ds
from .engine.memory import peak_rss_gb, reset_peak_rss


class MetricsLogger:
    def __init__(self, out_dir: str | Path, step_name: str, tensorboard: bool = True,
                 tensorboard_path: str | None = None, console: bool = False, fresh: bool = False):
        self.main = ds.is_main()
        self.console = console
        self.step_name = step_name
        self._tb = None
        self._file = None
        self.trackers: list = []  # --report-to wandb... (chatrl/tracking.py), set by start_run
        if not self.main:
            return
        reset_peak_rss()  # the first training row's peak covers everything from here
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a new log; a resumed run appends (see truncate_after).
        self._file = open(out_dir / "metrics.jsonl", "w" if fresh else "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tensorboard_path or str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; tolerate a broken install
                print("warning: tensorboard is not importable; TensorBoard logs are off", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after `step` by the interrupted run (they are redone)."""
        if not self.main:
            return
        path = Path(self._file.name)
        self._file.close()
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
        self._file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.main:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        if kind == "train":  # this process's peak RSS since the previous training row
            clean["memory/peak_rss_gb"] = round(peak_rss_gb(), 3)
            reset_peak_rss()
        row = {"step": step, "kind": kind, "time": time.time(), **clean}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{self.step_name}/{k}", v, step)
        for tracker in self.trackers:
            tracker.log(step, clean, kind)
        if self.console:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in clean.items())
            write_line(f"[{self.step_name} {kind} {step}] {shown}")

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def write_line(text: str) -> None:
    """Print without breaking an active progress bar."""
    if ds.is_main():
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    """A tqdm bar with ETA on rank 0; a silent stand-in elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                disable=not (enabled and ds.is_main()), file=sys.stderr, mininterval=0.5)


def progress_iter(items, desc: str, enabled: bool = True):
    """Iterate with a progress bar (rank 0), e.g. over evaluation batches."""
    items = list(items)
    bar = progress(len(items), desc, enabled, unit="batch")
    for x in items:
        yield x
        bar.update(1)
    bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
