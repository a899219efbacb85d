"""Helpers of the fault-injection suite: run the real CLI under tests/faults/driver.py, read what a
step left behind, and compare it with an uninterrupted reference run.

Runs are short (4 optimizer steps / PPO iterations of the tiny random model, a checkpoint after
each one) and use one intra-op thread (ppo_helpers.child_env): this suite must stay within a few
minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import torch

from ppo_helpers import PYTHON, child_env, run

DRIVER = Path(__file__).resolve().parent / "driver.py"
STEPS = 4

COMMON = ["--progress", "false", "--enable_tensorboard", "false", "--dtype", "fp32",
          "--max_steps", str(STEPS), "--checkpoint_interval", "1"]
SUPERVISED = ["--model_name_or_path", "tiny", "--max_seq_len", "64", "--per_device_train_batch_size", "4",
              "--per_device_eval_batch_size", "4", "--eval_iters", "1", "--dropout", "0", *COMMON]
PPO = ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
       "--max_prompt_seq_len", "64", "--max_answer_seq_len", "8", "--actor_learning_rate", "1e-4",
       "--critic_learning_rate", "1e-4", "--num_warmup_steps", "0", "--actor_dropout", "0",
       "--critic_dropout", "0", *COMMON]

# What must be equal between a resumed run and the uninterrupted one (train rows).
SAME = {"sft": ("loss", "lr"), "rm": ("loss", "accuracy", "lr"), "dpo": ("loss", "margin", "lr"),
        "ppo": ("reward/score", "loss/actor", "loss/critic", "policy/kl", "response/length")}
# Folders a finished step publishes; the first one marks the step finished (published last).
FINAL = {"sft": ("model",), "rm": ("model",), "dpo": ("model",), "ppo": ("actor", "critic")}


def step_args(step: str, out: Path, models: tuple[str, str] | None = None) -> list[str]:
    """The full command line (after `chatrl`) of a fault-suite run of `step` into `out`."""
    if step == "ppo":
        actor, critic = models
        return ["ppo", "--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic,
                "--output_dir", str(out), *PPO]
    return [step, "--output_dir", str(out), *SUPERVISED]


def chatrl_faulty(args: list, faults: str = "", check: bool = False, timeout: float = 300):
    """`chatrl ARGS` under the fault driver (no faults: the plain CLI plus inert patches)."""
    return run([PYTHON, DRIVER, *args], check=check, timeout=timeout,
               env=child_env(CHATRL_FAULTS=faults))


class References:
    """Uninterrupted runs of each step with the suite's settings (checkpoints kept)."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict[str, Path] = {}
        self._lock = threading.RLock()

    def _run(self, step: str) -> Path:
        out = self.root / step
        models = self.models() if step == "ppo" else None
        chatrl_faulty(step_args(step, out, models) + ["--keep_checkpoints"], check=True)
        return out

    def __call__(self, step: str) -> Path:
        with self._lock:
            if step not in self._done:
                pending = [s for s in ("sft", "rm") if s not in self._done]
                if step in ("sft", "rm", "ppo") and pending:
                    # SFT and RM together (2 cores, 1 thread each); PPO starts from both
                    threads = {s: _Bg(self._run, s) for s in pending}
                    self._done.update({s: t.result() for s, t in threads.items()})
                if step not in self._done:
                    self._done[step] = self._run(step)
            return self._done[step]

    def models(self) -> tuple[str, str]:
        """(actor, critic) for PPO: the reference SFT and RM models."""
        return str(self("sft") / "model"), str(self("rm") / "model")


class _Bg(threading.Thread):
    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- reading outputs

def strict_rows(out: Path) -> list[dict]:
    """metrics.jsonl rows, refusing NaN/Infinity (not JSON)."""
    def no_constant(name):
        raise AssertionError(f"{out}/metrics.jsonl holds {name}")

    path = Path(out) / "metrics.jsonl"
    return [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()
            if line.strip()]


def train_rows(out: Path) -> list[dict]:
    return [r for r in strict_rows(out) if r["kind"] == "train"]


def eval_rows(out: Path) -> list[dict]:
    return [r for r in strict_rows(out) if r["kind"] == "eval"]


def checkpoint_dirs(out: Path) -> list[str]:
    root = Path(out) / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def latest(out: Path) -> str | None:
    """The checkpoint `latest` names, asserting it is complete (its trainer state is there)."""
    marker = Path(out) / "checkpoints" / "latest"
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    state = json.loads((Path(out) / "checkpoints" / name / "trainer_state.json").read_text())
    assert state["step"] == int(name.split("-")[1]), (name, state)
    return name


def assert_unfinished(out: Path, step: str) -> None:
    """Nothing that looks like a finished step: the folder that marks it finished is absent (a
    hidden temporary folder of an interrupted save may hold a chatrl.json; PPO's critic may be
    published before its actor)."""
    marker = Path(out) / FINAL[step][0]
    assert not marker.exists(), f"{marker} exists after a failed run"


def hidden_temps(out: Path) -> list[str]:
    """Temporary folders of interrupted saves (`.model.tmp-*`, `checkpoints/.tmp-step-*`)."""
    out = Path(out)
    found = [p.name for p in out.glob(".*.tmp-*")]
    if (out / "checkpoints").is_dir():
        found += [f"checkpoints/{p.name}" for p in (out / "checkpoints").glob(".tmp-*")]
    return sorted(found)


def engine_state_file(ckpt_dir: Path, engine: str = "model") -> Path:
    return Path(ckpt_dir) / engine / "state" / "mp_rank_00_model_states.pt"


def checkpoint_weights_finite(ckpt_dir: Path, engine: str = "model") -> bool:
    state = torch.load(engine_state_file(ckpt_dir, engine), map_location="cpu", weights_only=False)
    return all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())


def assert_same_rows(got: list[dict], want: list[dict], keys, rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], (got, want)
    for g, w in zip(got, want):
        for k in keys:
            a, b = g[k], w[k]
            assert math.isfinite(a) and abs(a - b) <= rel * max(abs(b), 1e-8) + 1e-12, \
                f"step {w['step']} {k}: {a!r} vs uninterrupted {b!r}"
