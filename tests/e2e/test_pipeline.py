"""`chatrl train` (and DeepSpeed-Chat's `python train.py`): the three steps end to end.

- `chatrl train --preset smoke --output-dir D` finishes in under 3 minutes; writes report.md (with
  the numbers of the runs' own metrics) and 4 valid PNG plots; DeepSpeed-Chat's layout
  D/actor-models/tiny/model, D/reward-models/tiny/model, D/step3-models/tiny/actor; prints how to
  chat with the result.
- Killed with SIGKILL (whole process group) during step 2, the same command re-run skips step 1
  ("already finished"), resumes step 2 from its checkpoint, finishes; step 1's files are untouched
  (same bytes, same mtimes).
- `python train.py --actor-model DIR --reward-model DIR --num-gpus 1 --output-dir D2` with
  key=value overrides (scoped `sft.max_steps=2` and unscoped `per_device_train_batch_size=4`,
  routed to the steps that have them) runs end to end.
- `--deployment-type multi_node` without a hostfile: one `chatrl: error:` line, exit 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ppo_helpers import (PYTHON, REPO, assert_png, chatrl, file_digests, kill_group, logs, metrics,
                         run, start, wait_for)

PLOTS = {"sft_loss.png", "rm_loss_accuracy.png", "ppo_reward_kl_length.png", "ppo_time_split.png"}


def _last_eval(out_dir, key):
    return [r[key] for r in metrics(out_dir, kind="eval") if key in r][-1]


def test_smoke_pipeline_layout_report_and_plots(tmp_path):
    out = tmp_path / "out"
    proc = chatrl("train", "--preset", "smoke", "--output-dir", out, timeout=400, cwd=tmp_path)

    sft, rm, ppo = out / "actor-models" / "tiny", out / "reward-models" / "tiny", out / "step3-models" / "tiny"
    for folder, kind in ((sft / "model", "causal_lm"), (rm / "model", "reward_model")):
        assert json.loads((folder / "chatrl.json").read_text())["kind"] == kind
    assert (ppo / "actor" / "model.safetensors").exists() and (ppo / "critic" / "value_head.safetensors").exists()
    # each step ran the preset's length (smoke.yaml: 8, 8, 4)
    assert [r["step"] for r in metrics(sft)] == list(range(1, 9))
    assert [r["step"] for r in metrics(rm)] == list(range(1, 9))
    assert [r["step"] for r in metrics(ppo)] == [1, 2, 3, 4]
    # the next step started from the previous one's output
    ppo_cfg = (ppo / "run_config.yaml").read_text()
    assert str(sft / "model") in ppo_cfg and str(rm / "model") in ppo_cfg

    actor = ppo / "actor"
    assert f"chatrl chat --path {actor}" in proc.stdout, proc.stdout

    # report: plots referenced and valid; numbers are the runs' own
    report = (out / "report.md").read_text()
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert pngs == PLOTS
    for name in PLOTS:
        assert_png(out / "plots" / name)
        assert f"(plots/{name})" in report
    assert f"SFT held-out perplexity: {_last_eval(sft, 'perplexity'):.3f}" in report
    assert f"Reward model held-out accuracy: {_last_eval(rm, 'accuracy'):.3f}" in report
    assert "; 4 iterations" in report
    for model in ("base", "SFT", "RLHF"):
        assert re.search(rf"^\| {model} \| [+-]\d\.\d{{3}} \|$", report, re.M), model
    answers = json.loads((out / "report.json").read_text())
    assert set(answers) == {"base", "SFT", "RLHF"}
    assert answers["RLHF"]["model"] == str(actor)
    assert all(len(v["answers"]) == 96 for v in answers.values())  # --report-prompts default
    assert re.search(r"^RLHF - SFT: [+-]\d\.\d{3}, standard error \d\.\d{3} ", report, re.M), report


def test_killed_during_step2_rerun_skips_step1_and_resumes(tmp_path):
    out = tmp_path / "out"
    # the same command both times; a checkpoint after every step-2 update
    cmd = [PYTHON, "-m", "chatrl", "train", "--preset", "smoke", "--output-dir", out,
           "rm.checkpoint_interval=1", "progress=false", "enable_tensorboard=false"]
    first = start(cmd, tmp_path, "first", cwd=tmp_path)
    rm_ckpt = out / "reward-models" / "tiny" / "checkpoints" / "latest"
    wait_for(rm_ckpt.exists, first, 300, "a step-2 checkpoint")
    kill_group(first)
    assert first.returncode == -9, logs(first)
    sft_model = out / "actor-models" / "tiny" / "model"
    assert (sft_model / "chatrl.json").exists()
    assert not (out / "reward-models" / "tiny" / "model").exists(), "step 2 finished before the kill"
    before = file_digests(sft_model)
    rows_before = len(metrics(out / "reward-models" / "tiny"))

    second = run(cmd, timeout=400, cwd=tmp_path)
    err = second.stderr
    assert f"[chatrl train] step sft: already finished ({sft_model}); skipping" in err, err[-3000:]
    assert "[chatrl train] step sft ->" not in err
    m = re.search(r"resumed from \S*step-(\d+) at step (\d+)", err)
    assert m and m.group(1).lstrip("0") == m.group(2), err[-3000:]
    resumed_at = int(m.group(2))
    assert 1 <= resumed_at < 8
    # The killed run may have logged steps past its last checkpoint; the resumed run drops those
    # rows and logs the rest of step 2 once: steps 1..8, each once.
    assert rows_before >= resumed_at
    assert [r["step"] for r in metrics(out / "reward-models" / "tiny")] == list(range(1, 9))
    assert (out / "step3-models" / "tiny" / "actor" / "chatrl.json").exists()
    assert "chatrl chat --path" in second.stdout
    assert file_digests(sft_model) == before, "step 1's model folder changed"


def test_train_py_dschat_entry_point_with_overrides(tmp_path, tiny_model_path):
    out = tmp_path / "out"
    overrides = ["sft.max_steps=2", "rm.max_steps=2", "ppo.max_steps=2",
                 "per_device_train_batch_size=4", "max_seq_len=64", "eval_iters=1",
                 "ppo.per_device_generation_batch_size=4", "ppo.per_device_training_batch_size=4",
                 "ppo.max_prompt_seq_len=64", "ppo.max_answer_seq_len=8", "ppo.num_warmup_steps=0",
                 "dtype=fp32", "progress=false", "enable_tensorboard=false"]
    proc = run([PYTHON, REPO / "train.py", "--actor-model", tiny_model_path, "--reward-model",
                tiny_model_path, "--num-gpus", "1", "--output-dir", out, "--report-prompts", "2",
                *overrides], timeout=400, cwd=tmp_path)
    tag = Path(tiny_model_path).name
    sft, rm, ppo = (out / kind / tag for kind in ("actor-models", "reward-models", "step3-models"))
    for d in (sft, rm, ppo):
        assert [r["step"] for r in metrics(d)] == [1, 2], d
    assert (sft / "model" / "chatrl.json").exists() and (rm / "model" / "value_head.safetensors").exists()
    assert (ppo / "actor" / "chatrl.json").exists() and (out / "report.md").exists()
    import yaml

    cfg = {name: yaml.safe_load((d / "run_config.yaml").read_text()) for name, d in
           (("sft", sft), ("rm", rm), ("ppo", ppo))}
    # unscoped keys went to every step that has them; scoped ones to their step only
    assert cfg["sft"]["per_device_train_batch_size"] == cfg["rm"]["per_device_train_batch_size"] == 4
    assert cfg["sft"]["max_seq_len"] == cfg["rm"]["max_seq_len"] == 64
    assert cfg["ppo"]["per_device_generation_batch_size"] == 4 and cfg["ppo"]["max_answer_seq_len"] == 8
    assert cfg["sft"]["model_name_or_path"] == cfg["rm"]["model_name_or_path"] == tiny_model_path
    assert cfg["ppo"]["actor_model_name_or_path"] == str(sft / "model")
    assert cfg["ppo"]["critic_model_name_or_path"] == str(rm / "model")
    assert all(c["dtype"] == "fp32" for c in cfg.values())
    assert f"chatrl chat --path {ppo / 'actor'}" in proc.stdout


@pytest.mark.skipif(Path("/job/hostfile").exists(), reason="a real /job/hostfile is present")
def test_multi_node_without_hostfile_is_one_line_error(tmp_path):
    out = tmp_path / "out"
    proc = run([PYTHON, REPO / "train.py", "--deployment-type", "multi_node", "--preset", "smoke",
                "--output-dir", out], check=False, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("chatrl: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "hostfile" in lines[0] and "/job/hostfile" in lines[0] and "--hostfile" in lines[0]
    assert not out.exists(), "nothing should be written before the error"


# Runs the given steps one after another in one process, as `chatrl train` does, and prints what
# the previous step left alive once it returned.
_IN_PROCESS = """
import gc, json, sys, torch
from chatrl.cli import main
for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
    gc.collect()
    live = gc.get_objects()
    print("ALIVE", argv[0], sum(type(o).__name__ == "DeepSpeedEngine" for o in live),
          sum(isinstance(o, torch.nn.Parameter) for o in live), flush=True)
"""


def test_a_bf16_step_run_in_process_hands_back_its_engine_and_model(tmp_path):
    """`chatrl train` runs its steps in one process. A bf16 step's DeepSpeed engine (its ZeRO
    optimizer's gradient hooks close a reference cycle through autograd that the garbage collector
    cannot see) used to outlive the step with its model, gradients and optimizer state: the
    default run's PPO step peaked at 7.7 GB with native bf16, where 4.4 GB ran it alone."""
    common = ["--progress", "false", "--enable_tensorboard", "false", "--dtype", "bf16"]
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    steps = [
        ["sft", "--model_name_or_path", "tiny", "--max_seq_len", "64", "--max_steps", "2",
         "--output_dir", str(sft), *common],
        ["rm", "--model_name_or_path", "tiny", "--max_seq_len", "64", "--max_steps", "2",
         "--output_dir", str(rm), *common],
        ["ppo", "--actor_model_name_or_path", str(sft / "model"),
         "--critic_model_name_or_path", str(rm / "model"), "--max_steps", "1",
         "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "2",
         "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
         "--output_dir", str(tmp_path / "ppo"), *common],
    ]
    res = run([PYTHON, "-c", _IN_PROCESS, json.dumps(steps)], timeout=400)
    alive = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("ALIVE")]
    assert alive == [["sft", "0", "0"], ["rm", "0", "0"], ["ppo", "0", "0"]], res.stdout[-2000:]
