"""Shared helpers of the step-level tests: run the real `chatrl` command, read what a step wrote.

Whole steps run in subprocesses (`python -m chatrl ...`, environment inherited from the test
process, which tests/conftest.py made offline with a private cache), so every run gets its own
process group and nothing leaks between runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

PYTHON = sys.executable

# Fast flags for the tiny random model (2 layers, hidden 64) on the built-in demo task.
TINY = ["--model_name_or_path", "tiny", "--max_seq_len", "128", "--progress", "false",
        "--enable_tensorboard", "false", "--dropout", "0"]


def chatrl(*args, check: bool = True, timeout: float = 300, launcher: list[str] | None = None,
           python_code: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m chatrl ARGS` (or `launcher + ARGS`, or `python -c CODE ARGS`), with `stdin` as
    its input if given."""
    args = [str(a) for a in args]
    if launcher is not None:
        cmd = launcher + args
    elif python_code is not None:
        cmd = [PYTHON, "-c", python_code] + args
    else:
        cmd = [PYTHON, "-m", "chatrl"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
                          input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# A driver that runs the CLI and dies by SIGKILL (no clean-up, like a crash or an OOM kill) as
# soon as the metrics row of step KILL_AT_STEP is about to be written, i.e. in the middle of
# training, after the checkpoints before that step were completed. Polling the output folder
# from the test would race: on the tiny model a step takes milliseconds.
KILL_DRIVER = """
import os, signal, sys
import chatrl.logging as L
kill_at = int(os.environ["CHATRL_TEST_KILL_AT_STEP"])
_log = L.MetricsLogger.log
def log(self, step, metrics, kind="train"):
    if kind == "train" and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return _log(self, step, metrics, kind)
L.MetricsLogger.log = log
from chatrl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def chatrl_killed_at(step: int, *args) -> subprocess.CompletedProcess:
    """Run `chatrl ARGS` and SIGKILL it when it reaches optimizer step `step`."""
    os.environ["CHATRL_TEST_KILL_AT_STEP"] = str(step)
    try:
        return chatrl(*args, check=False, python_code=KILL_DRIVER)
    finally:
        del os.environ["CHATRL_TEST_KILL_AT_STEP"]


def deepspeed_launcher() -> str:
    """The `deepspeed` launcher of this environment (beside the interpreter, else on PATH)."""
    here = Path(PYTHON).parent / "deepspeed"
    if here.exists():
        return str(here)
    found = shutil.which("deepspeed")
    if not found:
        raise FileNotFoundError("the deepspeed launcher is not installed")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- reading outputs

def metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(out_dir) -> list[dict]:
    return [r for r in metrics(out_dir) if r["kind"] == "train"]


def eval_rows(out_dir) -> list[dict]:
    return [r for r in metrics(out_dir) if r["kind"] == "eval"]


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in train_rows(out_dir)]


def lrs_used(out_dir, peak: float) -> list[float]:
    """The learning rate of each update: the peak for the first, then the rate logged after each
    step (the scheduler steps once per update, before the row is logged)."""
    rows = train_rows(out_dir)
    return [peak] + [r["lr"] for r in rows[:-1]]


def safetensors_dir(folder: str | Path) -> dict:
    """Every tensor of every *.safetensors file in a model folder (value head excluded)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name != "value_head.safetensors":
            out.update(load_file(str(f)))
    return out


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def assert_rel(a: float, b: float, rel: float, what: str = "") -> None:
    assert math.isfinite(a) and math.isfinite(b), (what, a, b)
    assert rel_err(a, b) <= rel, f"{what}: {a!r} vs {b!r} (relative error {rel_err(a, b):.3g} > {rel})"


def cli_error(capsys, *argv) -> str:
    """Run `chatrl ARGV` in-process; assert exit 2 and return its single error line."""
    from chatrl.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return error_line(err)


def error_line(stderr: str) -> str:
    """The single `chatrl: error: ...` line of a failed run's stderr (asserting there is one and no
    traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("chatrl: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
