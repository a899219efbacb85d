"""Helpers of the step-3 (PPO), hybrid-engine, DeepSpeed-Chat API and pipeline tests.

Whole runs are subprocesses (`python -m chatrl ...`) in their own session (process group), so a
test can kill -9 a run with everything it started. Their environment is this process's minus the
process-group variables (RANK, MASTER_PORT, ...): tests that build models in-process create a
1-rank group here, and a child that inherited its MASTER_PORT would try to bind the same port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Set by the DeepSpeed / torch launchers (or by chatrl's in-process set-up); never inherited.
_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE",
               "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")

# Step-3 flags for the tiny model: small rollouts, short answers, no TensorBoard, no bars.
PPO_FAST = ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "2",
            "--max_prompt_seq_len", "64", "--max_answer_seq_len", "16",
            "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-4",
            "--num_warmup_steps", "0", "--progress", "false", "--enable_tensorboard", "false",
            "--dtype", "fp32"]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _GROUP_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread: the tiny model gains nothing from more, and on a small shared machine
    # spinning OpenMP threads of several processes make a PPO iteration ~15x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    here = Path(PYTHON).parent / "deepspeed"
    return str(here) if here.exists() else (shutil.which("deepspeed") or "deepspeed")


# ----------------------------------------------------------------------------- processes

def run(cmd: list, *, timeout: float = 300, cwd: str | Path | None = None, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (a hang fails the
    test instead of blocking the suite)."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env or child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)}\ndid not finish in {timeout}s (hung?)\n--- stdout\n"
                             f"{out[-3000:]}\n--- stderr\n{err[-6000:]}") from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexited {proc.returncode}\n--- stdout\n"
                             f"{out[-3000:]}\n--- stderr\n{err[-6000:]}")
    return res


def chatrl(*args, **kw) -> subprocess.CompletedProcess:
    """`python -m chatrl ARGS`."""
    return run([PYTHON, "-m", "chatrl", *args], **kw)


def start(cmd: list, log_dir: Path, name: str, cwd: str | Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """Start a command in the background (own process group), stdout/stderr to files."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name}.out", "w")
    err = open(log_dir / f"{name}.err", "w")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True, cwd=cwd,
                            env=env or child_env(), start_new_session=True)
    proc.logs = (log_dir / f"{name}.out", log_dir / f"{name}.err")
    return proc


def logs(proc) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in proc.logs)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` (the run and anything it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(pred, proc: subprocess.Popen, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `pred()` until true; fail if the process exits first or the time runs out."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}\n{logs(proc)}")
        time.sleep(interval)
    kill_group(proc)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs(proc)}")


def wait_all(procs: dict, timeout: float = 300) -> None:
    """Wait for every started process of `procs` ({name: Popen}); fail naming the first that hung
    or failed, with its logs."""
    for name, p in procs.items():
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p)
        assert p.returncode == 0, f"{name}\n{logs(p)}"


# ----------------------------------------------------------------------------- in-process

@contextlib.contextmanager
def one_thread():
    """torch.set_num_threads(1) for in-process work (see child_env), restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def init_in_process() -> None:
    """The 1-rank process group for in-process tests, without leaving MASTER_ADDR/PORT, RANK and
    WORLD_SIZE in this process's environment: other test files' subprocesses inherit it, and a
    child given this process's MASTER_PORT would try to bind it. LOCAL_RANK stays (DeepSpeed's
    engine reads it at every initialize); the group itself no longer needs the others."""
    from chatrl.engine import ds

    before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    ds.init_distributed()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)


# ----------------------------------------------------------------------------- step 1 + 2 models

_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()


def sft_rm_models(root: Path) -> tuple[str, str]:
    """(actor, critic): step-1 and step-2 model folders made by the real CLI from the tiny model,
    two optimizer steps each (the two runs in parallel). Built once per test process."""
    with _MODELS_LOCK:
        if "paths" in _MODELS:
            return _MODELS["paths"]
        common = ["--model_name_or_path", "tiny", "--max_steps", "2", "--max_seq_len", "64",
                  "--per_device_train_batch_size", "4", "--progress", "false",
                  "--enable_tensorboard", "false", "--eval_iters", "1", "--dtype", "fp32"]
        procs = [start([PYTHON, "-m", "chatrl", step, "--output_dir", root / step, *common], root, step)
                 for step in ("sft", "rm")]
        for p in procs:
            try:
                p.wait(timeout=240)
            except subprocess.TimeoutExpired:
                kill_group(p)
            assert p.returncode == 0, logs(p)
        _MODELS["paths"] = (str(root / "sft" / "model"), str(root / "rm" / "model"))
        return _MODELS["paths"]


@pytest.fixture(scope="session")
def ppo_models(tmp_path_factory):
    """Session fixture (imported by the test files that need it): step-1 and step-2 outputs,
    built once per test session: under pytest-xdist the first worker to ask builds them in the
    session's shared temporary folder and the others wait for it (a file lock) and read them."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return sft_rm_models(tmp_path_factory.mktemp("sft-rm"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "sft-rm"  # this session's, not a worker's
    with FileLock(f"{shared}.lock"):
        done = shared / "built"
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
            shared.mkdir()
            sft_rm_models(shared)
            done.touch()
    return str(shared / "sft" / "model"), str(shared / "rm" / "model")


def boost_eos(src: str, dst: Path, strength: float = 4.0) -> str:
    """A copy of a causal-LM folder whose EOS logit is raised: the tiny random model almost never
    samples its EOS (1 in ~500 tokens), so masks after an EOS would go untested. The EOS row of
    the (tied) output embedding is pointed along the mean final hidden state, giving EOS a
    probability of roughly 5-50% per token depending on the context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    texts = ["Tell me about the ocean.", "Rain is lovely, it makes gardens happy",
             "The quick brown fox jumps over the lazy dog 0 1 2 3"]
    with torch.no_grad():
        h = torch.cat([model(**tok(t, return_tensors="pt"), output_hidden_states=True)
                       .hidden_states[-1][0] for t in texts])
        mu = h.mean(0)
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = strength * mu / mu.norm() ** 2
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    for f in ("chatrl.json",):
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, Path(dst) / f)
    return str(dst)


# ----------------------------------------------------------------------------- reading outputs

def metrics(out_dir: str | Path, kind: str = "train") -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


def state_dict_of(folder: str | Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name != "value_head.safetensors":
            out.update(load_file(str(f)))
    return out


def file_digests(folder: str | Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5000) -> tuple[int, int]:
    """A real PNG of non-trivial size; returns (width, height) from its IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", path
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND", f"{path} is truncated"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w >= 200 and h >= 150, (path, w, h)
    return w, h
