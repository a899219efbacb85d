"""Issue 9, item 1: a diverging run is an error, never a success.

Real divergence (no injection): a learning rate of 1e30 without gradient clipping sends every
weight to about +-1e30 after one update, and the next forward is NaN.
- `chatrl sft --preset smoke --learning-rate 1e30 --max-grad-norm 0` stops with one error line
  naming the step whose loss is not finite, exit 2, no model, no NaN in metrics.jsonl;
- PPO: the update of iteration 1 is checked before its checkpoint, so no checkpoint with exploded
  weights is kept;
- `chatrl train`: the diverged step 1 is not marked finished and step 2 never starts.
"""

from __future__ import annotations

from fault_helpers import PPO, assert_unfinished, latest, strict_rows, train_rows
from helpers import error_line
from ppo_helpers import PYTHON, run

FLAGS = ["--progress", "false", "--enable_tensorboard", "false"]


def test_sft_learning_rate_1e30_is_an_error_not_success(tmp_path):
    out = tmp_path / "sft"
    p = run([PYTHON, "-m", "chatrl", "sft", "--preset", "smoke", "--learning-rate", "1e30",
             "--max-grad-norm", "0", "--output-dir", out, *FLAGS], check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "not finite" in line and "--learning-rate" in line and "--max-grad-norm" in line, line
    assert "done" not in p.stderr
    assert_unfinished(out, "sft")
    assert latest(out) is None
    steps = [r["step"] for r in train_rows(out)]  # strictly parsed: no NaN row was logged
    assert steps == list(range(1, len(steps) + 1)) and f"step {len(steps) + 1}:" in line, (steps, line)


def test_ppo_exploded_update_is_caught_before_its_checkpoint(refs, tmp_path):
    actor, critic = refs.models()
    out = tmp_path / "ppo"
    args = [a for a in PPO]
    for flag in ("--actor_learning_rate", "--critic_learning_rate"):
        args[args.index(flag) + 1] = "1e30"
    p = run([PYTHON, "-m", "chatrl", "ppo", "--actor_model_name_or_path", actor,
             "--critic_model_name_or_path", critic, "--output_dir", out, *args, "--max_grad_norm", "0"],
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "iteration 1" in line and "not finite" in line, line
    assert_unfinished(out, "ppo")
    assert latest(out) is None  # iteration 1's checkpoint (weights ~1e30) was never written
    strict_rows(out)


def test_train_does_not_mark_a_diverged_step_finished(tmp_path):
    out = tmp_path / "out"
    p = run([PYTHON, "-m", "chatrl", "train", "--preset", "smoke", "--output-dir", out,
             "sft.learning_rate=1e30", "sft.max_grad_norm=0", "progress=false",
             "enable_tensorboard=false", "--no-report"], check=False, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "not finite" in error_line(p.stderr)
    assert_unfinished(out / "actor-models" / "tiny", "sft")
    assert not (out / "reward-models").exists(), "step 2 started on a diverged step 1"
