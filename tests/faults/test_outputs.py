"""Issue 9: a step's output folder is never poisoned, and problems writing it are one line.

- A fresh run into a folder holding another run's checkpoints refuses (--resume / --overwrite)
  and changes nothing there; --overwrite starts afresh with a rewritten metrics.jsonl.
- Checkpoint rotation deletes only this run's own checkpoints (by its record, not by name).
- --resume on a finished step says so and exits 0, touching nothing.
- --resume with a different model or batch size is refused, naming the settings.
- --output-dir that is a file, a read-only output folder: one error line.
- A full disk (a real, small tmpfs where this machine allows mounting one): one error line naming
  the file and the space needed; the earlier checkpoint is intact and --resume finishes the run.
- Model files follow the umask; rows too long for --max-seq-len are counted, and when none is left
  the error names the length limit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fault_helpers import (assert_unfinished, chatrl_faulty, checkpoint_dirs, copy_run,
                           hidden_temps, latest, step_args, train_rows)
from helpers import error_line
from ppo_helpers import PYTHON, child_env, file_digests, run


def _interrupted_copy(refs, dst: Path) -> Path:
    """The SFT reference as an interrupted run would leave it: checkpoints, metrics, no model."""
    out = copy_run(refs("sft"), dst)
    shutil.rmtree(out / "model")
    return out


def _digests(out: Path) -> dict:
    return {k: v for k, v in file_digests(out).items() if not k.startswith("tensorboard")}


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(refs, tmp_path):
    out = _interrupted_copy(refs, tmp_path / "out")
    before = _digests(out)
    p = chatrl_faulty(step_args("sft", out))
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert str(out) in line and "--resume" in line and "--overwrite" in line and "step-000003" in line, line
    assert _digests(out) == before, "the refused run changed the folder (run_config.yaml, metrics...)"

    p = chatrl_faulty(step_args("sft", out) + ["--overwrite"], check=True)
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]  # rewritten, not appended
    assert (out / "model" / "chatrl.json").exists() and not (out / "checkpoints").exists()


def test_rotation_keeps_this_runs_checkpoints_whatever_their_names(tmp_path):
    from chatrl.engine import checkpoint as ckpt

    class Engine:
        def save_checkpoint(self, path, tag, save_latest):
            Path(path, tag).mkdir(parents=True)

    root = tmp_path / "checkpoints"
    (root / "step-000100").mkdir(parents=True)  # not written by this run
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, {"model": Engine()}, {}, keep=2)
    assert checkpoint_dirs(tmp_path) == ["step-000002", "step-000003", "step-000100"]
    assert (root / "latest").read_text().strip() == "step-000003"


def test_resume_on_a_finished_step_says_so_and_changes_nothing(refs, tmp_path):
    out = copy_run(refs("sft"), tmp_path / "out")
    before = _digests(out)
    p = chatrl_faulty(step_args("sft", out) + ["--resume"], check=True)
    assert "already finished" in p.stderr and str(out / "model") in p.stderr, p.stderr[-3000:]
    assert _digests(out) == before


def test_resume_with_other_model_or_batch_size_is_refused(refs, tmp_path):
    out = _interrupted_copy(refs, tmp_path / "out")
    before = _digests(out)
    args = step_args("sft", out) + ["--resume"]
    p = chatrl_faulty(args + ["--per_device_train_batch_size", "2", "--seed", "7"])
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "per_device_train_batch_size 4 -> 2" in line and "seed 1234 -> 7" in line, line
    assert "--overwrite" in line, line
    p = chatrl_faulty(args + ["--model_name_or_path", "tiny-gpt2"])
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "model_name_or_path" in line and "tiny-gpt2" in line, line
    assert _digests(out) == before


def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a folder\n")
    p = chatrl_faulty(step_args("sft", target))
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert str(target) in line and "is a file" in line, line
    assert target.read_text() == "not a folder\n"


def _mount_namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


MOUNTS = _mount_namespace_works()


def test_read_only_output_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    args = [PYTHON, "-m", "chatrl", *step_args("sft", out)]
    if os.geteuid() != 0:
        out.chmod(0o555)
        p = run(args, check=False)
    elif MOUNTS:  # root ignores permission bits: make it a read-only mount instead
        script = f'mount --bind "{out}" "{out}" && mount -o remount,bind,ro "{out}" && exec "$@"'
        p = run(["unshare", "-m", "sh", "-c", script, "sh", *args], check=False)
    else:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert str(out) in line and ("read-only" in line.lower() or "permission" in line.lower()), line


@pytest.mark.skipif(not MOUNTS, reason="needs `unshare -m` and tmpfs mounts (a real full disk)")
def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A 2 MB tmpfs holds one checkpoint of the tiny model but not two: the second fails as a
    real full disk fails (torch's writer raises RuntimeError, not OSError). The filesystem is then
    enlarged and --resume finishes. Then a 300 KB one fails the final model save."""
    mnt, snap = tmp_path / "mnt", tmp_path / "snap"
    mnt.mkdir(), snap.mkdir()
    ckpt_args = " ".join(step_args("sft", mnt / "o"))
    final_args = ckpt_args.replace("--checkpoint_interval 1", "--checkpoint_interval 0")
    script = f"""
        cd "{tmp_path}"
        mount -t tmpfs -o size=2m tmpfs "{mnt}"
        "{PYTHON}" -m chatrl {ckpt_args} > a.out 2> a.err; echo $? > a.rc
        cp -a "{mnt}/o" "{snap}/a"
        mount -o remount,size=16m "{mnt}"
        "{PYTHON}" -m chatrl {ckpt_args} --resume > b.out 2> b.err; echo $? > b.rc
        cp -a "{mnt}/o" "{snap}/b"
        umount "{mnt}" && mount -t tmpfs -o size=300k tmpfs "{mnt}"
        "{PYTHON}" -m chatrl {final_args} > c.out 2> c.err; echo $? > c.rc
        cp -a "{mnt}/o" "{snap}/c"
    """
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=600, env=child_env())
    rc = {k: int((tmp_path / f"{k}.rc").read_text()) for k in "abc"}
    err = {k: (tmp_path / f"{k}.err").read_text() for k in "abc"}

    assert rc["a"] == 2, err["a"][-3000:]
    line = error_line(err["a"])
    assert "no space left" in line.lower() and ".tmp-step-000002" in line, line
    assert re.search(r"needs about [\d.]+ MB", line) and "--resume" in line and "step-000001" in line, line
    assert latest(snap / "a") == "step-000001" and hidden_temps(snap / "a") == []
    assert_unfinished(snap / "a", "sft")

    assert rc["b"] == 0, err["b"][-3000:]
    assert "resumed from" in err["b"] and (snap / "b" / "model" / "chatrl.json").exists()
    assert [r["step"] for r in train_rows(snap / "b")] == [1, 2, 3, 4]

    assert rc["c"] == 2, err["c"][-3000:]
    line = error_line(err["c"])
    assert "no space left" in line.lower() and "model" in line and "needs about" in line, line
    assert "no checkpoint" in line, line
    assert_unfinished(snap / "c", "sft")
    assert hidden_temps(snap / "c") == []


def test_model_files_follow_the_umask(refs):
    mask = os.umask(0)
    os.umask(mask)
    model = refs("sft") / "model"
    modes = {p.name: p.stat().st_mode & 0o777 for p in [model, *model.iterdir()]}
    want = {name: (0o777 if name == "model" else 0o666) & ~mask for name in modes}
    assert modes == want


def test_rows_too_long_are_counted_and_an_empty_step_names_the_limit(tmp_path):
    from chatrl.config import SFTConfig
    from chatrl.models import load_tokenizer, resolve_model_path
    from chatrl.steps import common

    path = resolve_model_path("tiny")
    tok = load_tokenizer(path)
    cfg = SFTConfig(model_name_or_path=path, output_dir=str(tmp_path / "unused"))
    train, _, _ = common.step_datasets(cfg, tok, common.template_for(cfg, tok), "sft", 1, 10_000)
    too_long = sum(r["prompt_len"] >= 32 for r in train)
    assert 0 < too_long < len(train)

    args = [a for a in step_args("sft", tmp_path / "o")]
    args[args.index("--max_seq_len") + 1] = "32"
    args[args.index("--max_steps") + 1] = "1"
    p = chatrl_faulty(args, check=True)
    assert f"{too_long} of {len(train)} training rows" in p.stderr and "--max-seq-len 32" in p.stderr, \
        p.stderr[-3000:]

    args[args.index("--max_seq_len") + 1] = "8"
    args[args.index("--output_dir") + 1] = str(tmp_path / "o2")
    p = chatrl_faulty(args)
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "--max-seq-len 8" in line and "--data-split" not in line, line



def test_resume_when_no_checkpoint_can_be_read_removes_nothing(refs, tmp_path):
    out = _interrupted_copy(refs, tmp_path / "out")
    for name in checkpoint_dirs(out):
        state = out / "checkpoints" / name / "model" / "state" / "mp_rank_00_model_states.pt"
        state.write_bytes(state.read_bytes()[:100])
    before = _digests(out)
    p = chatrl_faulty(step_args("sft", out) + ["--resume"])
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p.stderr)
    assert "no checkpoint" in line and "can be read" in line and "--overwrite" in line, line
    assert {k: v for k, v in _digests(out).items() if k.startswith("checkpoints/step-")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/step-")}


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    from chatrl.cli import main

    assert main(["sft", "--model_name_or_path", "tiny", "--output_dir", str(tmp_path / "o"), "--resume",
                 "--overwrite"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line, line
    assert not (tmp_path / "o").exists()
