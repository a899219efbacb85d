"""A build lock left by a killed run must not hang the next one.

torch takes `<extension folder>/lock` every time DeepSpeed loads one of its JIT ops, and a process
that finds the lock waits for it to disappear, silently and for ever. Killing a first run during
a ~40 s build left every later command hanging at 0% CPU. (On CPU hosts chatrl no longer builds
DeepSpeed's shared-memory all-reduce, the op every command loaded then; CPU Adam is still built
for --offload on CUDA hosts.)
"""

import os
import subprocess
import sys
import time

import pytest

from ppo_helpers import PYTHON, child_env

from chatrl.engine.ds import STALE_LOCK_S, clear_stale_build_locks


def _lock(folder, age_s: float):
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    lock.write_text("")
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def test_only_stale_locks_are_removed(tmp_path, capsys):
    root = tmp_path / "ext"
    old = _lock(root / "py311_cpu" / "deepspeed_shm_comm", 3 * STALE_LOCK_S)
    fresh = _lock(root / "py311_cpu" / "cpu_adam", 5)            # a build that just started
    busy = _lock(root / "fused_adam", 3 * STALE_LOCK_S)          # ninja still works in its folder
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=busy.parent)
    try:
        removed = clear_stale_build_locks(str(root))
    finally:
        worker.kill()
        worker.wait()
    assert removed == [str(old)] and not old.exists()
    assert fresh.exists() and busy.exists()
    err = capsys.readouterr().err
    assert "removed a stale build lock" in err and str(old) in err


def test_a_command_after_a_killed_op_build_runs(tmp_path):
    """The real CLI, with the build locks of two ops left behind by a killed build."""
    env = child_env()
    root = tmp_path / "ext"
    locks = [_lock(root / name, 10 * STALE_LOCK_S) for name in ("deepspeed_shm_comm", "cpu_adam")]
    env["TORCH_EXTENSIONS_DIR"] = str(root)
    out = tmp_path / "sft"
    try:
        r = subprocess.run([PYTHON, "-m", "chatrl", "sft", "--model_name_or_path", "tiny", "--output_dir",
                            str(out), "--max_steps", "1", "--max_seq_len", "32", "--dtype", "fp32",
                            "--per_device_train_batch_size", "2", "--eval_iters", "1", "--progress", "false",
                            "--enable_tensorboard", "false"],
                           env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("chatrl sft hung on the build lock a killed run left")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed a stale build lock" in r.stderr
    assert (out / "model").is_dir() and not any(lock.exists() for lock in locks)
