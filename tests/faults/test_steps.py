"""Each step (sft, rm, dpo, ppo) through its real command, with faults injected by driver.py.

One folder per step goes through a chain of faults, each run checked before the next:
  1. SIGKILL while step 2's checkpoint is written: `latest` still names step 1's complete
     checkpoint; no model; the half-written checkpoint is only a hidden temporary folder;
  2. --resume, and the disk fills while step 3's checkpoint is written (ENOSPC): one error line
     naming the file and --resume, exit 2; the temporary folder of step 2 left by the kill is gone;
     `latest` names step 2, complete;
  3. step 2's checkpoint is corrupted (its engine state truncated), then --resume, SIGKILLed during
     the final save (PPO: of the actor, the critic being published already): a warning names the
     unreadable checkpoint and the fallback to step 1; the step does not look finished;
  4. --resume: the hidden temporary model folder is removed, the run finishes, and its metrics
     and saved weights equal those of an uninterrupted run.
rm and dpo run faults 1 and 4 only (their own batches, model and optimizer state through a kill
and a resume); faults 2 and 3 exercise the checkpoint writer and reader that every step shares,
run here by sft (the supervised loop rm and dpo also use) and ppo (two engines, two final saves).
Separately, a non-finite loss from step 3 on stops the step with one error line, keeps step 2's
checkpoint (finite weights) as `latest`, publishes no model and writes no NaN anywhere.
"""

from __future__ import annotations

import pytest

from fault_helpers import (FINAL, SAME, assert_same_rows, assert_unfinished, chatrl_faulty,
                           checkpoint_dirs, checkpoint_weights_finite, engine_state_file, eval_rows,
                           hidden_temps, latest, step_args, strict_rows, train_rows)
from helpers import error_line, safetensors_dir

STEPS = ["sft", "rm", "dpo", "ppo"]
EVERY_FAULT = ("sft", "ppo")  # the others: faults 1 and 4 (see above)
ENGINE = {"sft": "model", "rm": "model", "dpo": "model", "ppo": "actor"}


def _args(refs, step, out):
    return step_args(step, out, refs.models() if step == "ppo" else None)


def _disk_full_then_corrupt_and_killed_in_the_final_save(step, args, out):
    """Faults 2 and 3 of the chain, after fault 1 left `out` with step 1's checkpoint."""
    # 2. resumed; the disk fills while step 3's checkpoint is written
    p = chatrl_faulty(args + ["--resume"], "enospc_in_checkpoint=3")
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "no space left" in line.lower() and ".tmp-step-000003" in line, line
    assert "step-000002" in line and "--resume" in line, line
    assert "resumed from" in p.stderr and "step-000001" in p.stderr, p.stderr[-3000:]
    assert_unfinished(out, step)
    assert latest(out) == "step-000002" and hidden_temps(out) == []
    assert checkpoint_dirs(out) == ["step-000001", "step-000002"]

    # 3. step 2's checkpoint corrupted; resumed, killed during the final save
    state = engine_state_file(out / "checkpoints" / "step-000002", ENGINE[step])
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    p = chatrl_faulty(args + ["--resume"], f"kill_in_final_save={len(FINAL[step])}")
    assert p.returncode == -9, p.stderr[-3000:]
    warning = [ln for ln in p.stderr.splitlines() if "step-000002" in ln and "warning" in ln.lower()]
    assert warning and "step-000001" in warning[0], p.stderr[-3000:]
    assert_unfinished(out, step)
    assert [t.split(".tmp-")[0] for t in hidden_temps(out)] == [f".{FINAL[step][0]}"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_disk_full_corrupt_checkpoint_then_resume_matches_uninterrupted(step, refs, tmp_path):
    ref = refs(step)
    out = tmp_path / "out"
    args = _args(refs, step, out)

    # 1. killed while writing step 2's checkpoint
    p = chatrl_faulty(args, "kill_in_checkpoint=2")
    assert p.returncode == -9, p.stderr[-3000:]
    assert_unfinished(out, step)
    assert latest(out) == "step-000001" and checkpoint_dirs(out) == ["step-000001"]
    assert hidden_temps(out) == ["checkpoints/.tmp-step-000002"]
    assert [r["step"] for r in train_rows(out)] == [1, 2]

    if step in EVERY_FAULT:
        _disk_full_then_corrupt_and_killed_in_the_final_save(step, args, out)

    # 4. resumed to the end: same metrics and weights as the uninterrupted run
    p = chatrl_faulty(args + ["--resume"], check=True)
    assert hidden_temps(out) == [] and not (out / "checkpoints").exists()
    for name in FINAL[step]:
        assert (out / name / "chatrl.json").exists()
    assert_same_rows(train_rows(out), train_rows(ref), SAME[step])
    if step != "ppo":
        assert_same_rows(eval_rows(out)[-1:], eval_rows(ref)[-1:], ("eval/loss",))
    for name in FINAL[step]:
        got, want = safetensors_dir(out / name), safetensors_dir(ref / name)
        assert got.keys() == want.keys()
        for k in got:
            assert (got[k] - want[k]).abs().max() <= 1e-5, (name, k)


@pytest.mark.parametrize("step", STEPS)
def test_nonfinite_loss_stops_keeps_last_good_checkpoint(step, refs, tmp_path):
    out = tmp_path / "out"
    p = chatrl_faulty(_args(refs, step, out), "nan_from_step=3")
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "not finite" in line and "3" in line and "step-000002" in line and "--resume" in line, line
    assert_unfinished(out, step)
    assert latest(out) == "step-000002"
    assert checkpoint_weights_finite(out / "checkpoints" / "step-000002", ENGINE[step])
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    strict_rows(out)  # no NaN written
