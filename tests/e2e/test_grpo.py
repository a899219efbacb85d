"""Online RL beyond PPO through the real `chatrl grpo` / `chatrl rl` command on the tiny model.

The task: "Question k: do you like <topic>?" with an `answer` column ("yes") and a `topic`
column. Step 1 (SFT, once per module) teaches the tiny model to answer "yes" 30% of the time and
"no" otherwise; then:
- GRPO with the built-in `exact` verifier learns to answer "yes": held-out greedy accuracy and the
  training accuracy rise by a stated margin (measured: see the test);
- a user reward file in TRL's signature receives the prompts, the completions and the dataset's
  extra columns, aligned answer by answer, and mixed with a reward model by --reward-weights gives
  reward/score = sum of weight x source mean (each source logged on its own);
- a reward function that raises stops the run with one line naming it and the sample, or with
  --skip-bad-rewards is scored 0 and counted; a --reward-fn the file does not define, or
  --reward-weights that do not match, are refused before the output folder is claimed;
- a reward server on 127.0.0.1 scores the answers; with the server down the run stops with one
  line;
- killed after a checkpoint and resumed, the run logs the same remaining metrics as an
  uninterrupted one;
- every named algorithm runs (rl --algo ...) and logs its own metrics; with KL coefficient 0 no
  reference model is built.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from helpers import KILL_DRIVER, cli_error, error_line, free_port
from ppo_helpers import PYTHON, chatrl, child_env, init_in_process, metrics, one_thread, run
from ppo_helpers import ppo_models  # noqa: F401  (session fixture)

TOPICS = ["rain", "the sea", "music", "bread", "trains", "gardens", "mountains", "cats", "books",
          "coffee", "snow", "rivers"]
FAST = ["--progress", "false", "--enable_tensorboard", "false", "--dtype", "fp32", "--seed", "7"]
RL = ["--num_generations", "8", "--per_device_generation_batch_size", "4",
      "--per_device_training_batch_size", "16", "--max_prompt_seq_len", "48",
      "--max_answer_seq_len", "4", "--actor_learning_rate", "1e-3", *FAST]


def write_task(root):
    r = random.Random(0)
    sft, prompts = root / "sft.jsonl", root / "prompts.jsonl"
    with sft.open("w") as f, prompts.open("w") as g:
        for i in range(400):
            topic = r.choice(TOPICS)
            prompt = f"Question {i}: do you like {topic}?"
            said = "yes" if r.random() < 0.3 else "no"
            f.write(json.dumps({"prompt": prompt, "chosen": said}) + "\n")
            g.write(json.dumps({"prompt": prompt, "answer": "yes", "topic": topic}) + "\n")
    return sft, prompts


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-task")
    sft_data, prompts = write_task(root)
    chatrl("sft", "--model_name_or_path", "tiny", "--max_seq_len", "64", "--dropout", "0",
           "--per_device_train_batch_size", "8", "--data_path", sft_data, "--data_split", "10,0,0",
           "--learning_rate", "3e-3", "--max_steps", "80", "--num_train_epochs", "3", *FAST,
           "--output_dir", root / "sft", timeout=400)
    return root, str(root / "sft" / "model"), str(prompts)


def grpo_args(task, out, *args, cmd="grpo"):
    root, actor, prompts = task
    return [cmd, "--actor_model_name_or_path", actor, "--data_path", prompts, *RL, "--output_dir", out,
            *args]


def grpo(task, out, *args, check=True, cmd="grpo", env=None):
    return run([PYTHON, "-m", "chatrl", *grpo_args(task, out, *args, cmd=cmd)], timeout=400,
               check=check, env=child_env(**(env or {})))


def mean(xs):
    return sum(xs) / len(xs)


# ============================================================================ learning

def test_grpo_learns_the_verifiable_task(task, tmp_path):
    out = tmp_path / "out"
    grpo(task, out, "--reward_fn", "exact", "--max_steps", "16", "--eval_prompts", "40",
         "--eval_samples", "4", "--eval_interval", "8", "--log-rollouts-interval", "16")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    acc = [r["reward/accuracy"] for r in rows]
    # measured (seed 7): 0.22, 0.31 over the first 2 iterations, 0.97, 0.88, 0.84 over the last 3
    assert mean(acc[-3:]) >= mean(acc[:2]) + 0.3, acc
    evals = metrics(out, kind="eval")
    assert [r["step"] for r in evals] == [0, 8, 16]
    start, end = evals[0], evals[-1]
    # measured: greedy accuracy 0.0 at the start (the SFT model's greedy answer is "no"), 1.0 at
    # 8 and 16; sampled 0.19 -> 0.71 -> 0.89; pass@4 0.53 -> 1.0
    assert end["eval/greedy/accuracy"] >= start["eval/greedy/accuracy"] + 0.5, evals
    assert end["eval/sampled/accuracy"] >= start["eval/sampled/accuracy"] + 0.3, evals
    for r in evals:
        assert 0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= 1
        assert r["eval/pass@1"] == pytest.approx(r["eval/sampled/accuracy"], abs=1e-9)
    for r in rows:  # the metric list, every iteration
        for k in ("reward/exact/mean", "reward/exact/std", "reward/accuracy",
                  "sampling/zero_variance_groups", "response/length", "response/truncated",
                  "policy/entropy", "policy/clipfrac_low", "policy/clipfrac_high",
                  "policy/logprob_gap", "time/generate", "time/reward", "time/train"):
            assert k in r and math.isfinite(r[k]), (r["step"], k)
        assert "policy/kl" not in r  # no reference model at KL 0
    # The rollout log of a critic-free run: no reference log-probs, KL or values (null), each
    # source's score, and GRPO's advantages: one value per answer, centred within each group of 8.
    logged = [json.loads(line) for line in (out / "rollouts" / "iter_00016.jsonl").read_text().splitlines()]
    assert len(logged) == 4 * 8
    for r in logged:
        assert r["ref_logprob"] is None and r["kl"] is None and r["value"] is None
        assert r["rewards"] == {"exact": r["reward"]} and r["reward"] in (0.0, 1.0)
        assert len(r["advantage"]) == len(r["logprob"]) == len(r["entropy"]) == r["length"] >= 1
        assert max(r["advantage"]) - min(r["advantage"]) < 1e-6
    for g in range(4):
        group = logged[8 * g:8 * g + 8]
        assert abs(sum(r["advantage"][0] for r in group)) < 1e-3, group
    # `chatrl eval rl` on the saved policy: the same held-out prompts, the same greedy answers
    _, _, prompts = task
    res = chatrl("eval", "rl", "--path", out / "actor", "--data_path", prompts, "--reward_fn", "exact",
                 "--eval_prompts", "40", "--eval_samples", "0", "--max_answer_seq_len", "4",
                 "--dtype", "fp32", "--json")
    saved = json.loads(res.stdout.strip().splitlines()[-1])
    assert saved["eval/prompts"] == 40 and "eval/sampled/reward" not in saved  # greedy only
    assert saved["eval/greedy/accuracy"] == pytest.approx(end["eval/greedy/accuracy"], abs=1e-9)


# ============================================================================ reward sources

REWARD_FILE = '''
import json, os

def topic_reward(prompts, completions, answer, topic, **kwargs):
    """TRL's signature; logs what it got so the test can check the columns' alignment."""
    out = [len(c["content"]) / 10.0 if isinstance(c, list) else len(c) / 10.0 for c in completions]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "answer": answer,
                            "topic": topic, "keys": sorted(kwargs), "rewards": out}) + "\\n")
    return out

def broken(prompts, completions, **kwargs):
    return [1.0 / (len(c) - len(c)) if "e" in c else 0.5 for c in completions]
'''


def test_user_reward_file_with_columns_mixed_with_a_reward_model(task, ppo_models, tmp_path):
    _, rm = ppo_models
    fn = tmp_path / "my_rewards.py"
    fn.write_text(REWARD_FILE)
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "out"
    grpo(task, out, "--reward_fn", f"{fn}:topic_reward", "--reward_model_name_or_path", rm,
         "--reward_weights", "0.5", "2.0", "--max_steps", "2", "--eval_prompts", "0",
         env={"REWARD_LOG": str(log)})
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(calls) == 2  # one call per rollout batch
    for c in calls:
        assert len(c["prompts"]) == len(c["completions"]) == len(c["topic"]) == 32  # 4 prompts x 8
        # text prompts reach the function as strings (TRL's standard form), columns per answer
        assert all(isinstance(p, str) and isinstance(x, str) for p, x in zip(c["prompts"], c["completions"]))
        assert all(p.endswith(f"do you like {t}?") for p, t in zip(c["prompts"], c["topic"]))
        assert set(c["answer"]) == {"yes"} and "completion_ids" in c["keys"]
        assert c["prompts"][0] == c["prompts"][7] != c["prompts"][8]  # groups of 8 answers
    rows = metrics(out)
    for r, c in zip(rows, calls):
        assert r["reward/topic_reward/mean"] == pytest.approx(mean(c["rewards"]), rel=1e-5)
        assert "reward/model/mean" in r and "reward/model/std" in r
        want = 0.5 * r["reward/topic_reward/mean"] + 2.0 * r["reward/model/mean"]
        assert r["reward/score"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_failing_reward_function_stops_with_one_line_or_is_skipped(task, tmp_path):
    fn = tmp_path / "my_rewards.py"
    fn.write_text(REWARD_FILE)
    res = grpo(task, tmp_path / "a", "--reward_fn", f"{fn}:broken", "--max_steps", "1",
               "--eval_prompts", "0", check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    line = error_line(res.stderr)
    assert "reward broken raised ZeroDivisionError: float division by zero on sample" in line, line
    assert "--skip-bad-rewards" in line and "prompt 'Question" in line, line
    ok = grpo(task, tmp_path / "b", "--reward_fn", f"{fn}:broken", "--max_steps", "1",
              "--eval_prompts", "0", "--skip_bad_rewards")
    r = metrics(tmp_path / "b")[0]
    assert r["reward/broken/bad"] > 0 and r["reward/broken/mean"] < 0.5, r
    assert ok.returncode == 0


def test_reward_choices_are_refused_before_the_run_starts(task, tmp_path, capsys):
    """A --reward-fn name the file does not define, or --reward-weights that do not match the
    sources: one line, before any model loads or the output folder is claimed (in-process: the
    real entry point, which must return before it starts the run)."""
    fn = tmp_path / "my_rewards.py"
    fn.write_text(REWARD_FILE)
    for args, want in [
        (["--reward_fn", f"{fn}:nope"], "has no 'nope' (it defines: topic_reward, broken)"),
        (["--reward_fn", "exact", "--reward_weights", "1", "2"], "--reward-weights has 2 value(s) for 1"),
    ]:
        out = tmp_path / "out"
        assert want in cli_error(capsys, *grpo_args(task, out, *args, "--max_steps", "1")), args
        assert not out.exists(), args


def test_remote_reward_server_and_server_down(task, tmp_path):
    from chatrl.rewards.remote import serve_reward_function

    got = []

    def fn(prompts, completions, answer, topic):
        rewards = [float(c.strip().lower() == a) for c, a in zip(completions, answer)]
        got.append({"n": len(completions), "topics": topic, "rewards": rewards})
        return rewards

    server = serve_reward_function(fn)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        grpo(task, tmp_path / "ok", "--reward_url", url, "--max_steps", "2", "--eval_prompts", "0")
    finally:
        server.shutdown()
    rows = metrics(tmp_path / "ok")
    assert len(got) == 2 and all(g["n"] == 32 for g in got)
    for r, g in zip(rows, got):
        assert r["reward/remote/mean"] == pytest.approx(mean(g["rewards"]), abs=1e-6)
        assert r["reward/score"] == pytest.approx(mean(g["rewards"]), abs=1e-6)
    port = free_port()  # nothing listens there
    res = grpo(task, tmp_path / "down", "--reward_url", f"http://127.0.0.1:{port}/",
               "--reward_retries", "1", "--reward_timeout", "2", "--max_steps", "1", check=False)
    assert res.returncode == 2
    line = error_line(res.stderr)
    assert f"reward server http://127.0.0.1:{port}/ failed after 2 tries (ConnectionRefusedError" in line
    assert "check that it is running" in line


# ============================================================================ resume

def test_resume_after_kill_continues_with_the_same_metrics(task, tmp_path):
    root, actor, prompts = task
    args = ["grpo", "--actor_model_name_or_path", actor, "--data_path", prompts, *RL,
            "--reward_fn", "exact", "--max_steps", "4", "--checkpoint_interval", "2",
            "--eval_prompts", "8", "--eval_interval", "2", "--eval_samples", "2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run([PYTHON, "-m", "chatrl", *args, "--output_dir", whole], timeout=400)
    killed = run([PYTHON, "-c", KILL_DRIVER, *args, "--output_dir", part], timeout=400, check=False,
                 env=child_env(CHATRL_TEST_KILL_AT_STEP="3"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in metrics(part)] == [1, 2]
    resumed = run([PYTHON, "-m", "chatrl", *args, "--output_dir", part, "--resume"], timeout=400)
    assert "resumed from" in resumed.stderr
    a, b = metrics(whole), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for key in ("reward/score", "reward/accuracy", "loss/actor", "policy/entropy",
                    "response/length", "policy/approx_kl"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    ea, eb = metrics(whole, kind="eval"), metrics(part, kind="eval")
    assert [r["step"] for r in eb] == [0, 2, 4]
    assert eb[-1]["eval/sampled/reward"] == pytest.approx(ea[-1]["eval/sampled/reward"], abs=1e-9)


# ============================================================================ the family

@pytest.mark.parametrize("algo,extra,expect", [
    ("dapo", ["--max_answer_seq_len", "8"], ("sampling/rounds", "policy/clipfrac_high")),
    ("gspo", [], ("policy/clipfrac",)),
    ("rloo", [], ("policy/kl",)),            # KL in the reward (reference loaded)
    ("reinforce_pp", [], ("policy/kl",)),
    ("dr_grpo", ["--kl_coef", "0.04"], ("policy/kl", "policy/kl_loss")),  # k3 KL in the loss
])
def test_rl_algorithms_run(task, tmp_path, algo, extra, expect):
    out = tmp_path / algo
    grpo(task, out, "--algo", algo, "--reward_fn", "exact", "--max_steps", "2",
         "--eval_prompts", "0", *extra, cmd="rl")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss/actor", "reward/score", *expect):
            assert k in r and math.isfinite(r[k]), (algo, k, r)
        assert "loss/critic" not in r
    saved = json.loads((out / "actor" / "chatrl.json").read_text())
    assert saved["step"] == algo


def test_no_reference_or_critic_when_not_needed(task, tmp_path):
    from chatrl.config import RLConfig
    from chatrl.models import load_tokenizer
    from chatrl.steps.ppo import build_models

    _, actor, prompts = task
    init_in_process()
    tok = load_tokenizer(actor, padding_side="left")
    with one_thread():
        cfg = RLConfig(actor_model_name_or_path=actor, output_dir=str(tmp_path), data_path=[prompts],
                       reward_fn=["exact"], dtype="fp32")
        m = build_models(cfg, tok, 1, "fp32")
        assert m.ref is None and m.critic is None and m.reward is None
        cfg = RLConfig(actor_model_name_or_path=actor, output_dir=str(tmp_path), data_path=[prompts],
                       reward_fn=["exact"], dtype="fp32", kl_coef=0.04)
        m = build_models(cfg, tok, 1, "fp32")
        assert m.ref is not None and m.critic is None
        assert not any(p.requires_grad for p in m.ref.parameters())


def test_rl_config_errors_are_one_line(task, tmp_path, capsys):
    cases = [
        (["--algo", "grpo", "--num_generations", "1"], "num_generations >= 2"),
        (["--reward_fn", "exact", "--per_device_training_batch_size", "5"],
         "--per-device-generation-batch-size 4 x --num-generations 8 = 32 answers is not a "
         "multiple of --per-device-training-batch-size 5"),
    ]
    for args, want in cases:
        out = tmp_path / "x"
        assert want in cli_error(capsys, *grpo_args(task, out, *args, "--max_steps", "1")), args
        assert not out.exists(), args


def test_train_algo_grpo_runs_step_1_then_grpo(tmp_path):
    """`chatrl train --algo grpo`: SFT on the arithmetic task's worked solutions, then GRPO from
    that model in place of steps 2-3 (no reward model is trained)."""
    res = chatrl("train", "--algo", "grpo", "--preset", "smoke", "--output-dir", tmp_path / "out",
                 "--no-report", "sft.max_steps=2", "grpo.max_steps=2", timeout=400)
    root = tmp_path / "out"
    sft = root / "actor-models" / "tiny" / "model"
    rl = root / "rl-models" / "tiny"
    assert (sft / "chatrl.json").exists() and (rl / "actor" / "chatrl.json").exists()
    assert not (root / "reward-models").exists() and not (root / "step3-models").exists()
    assert json.loads((rl / "actor" / "chatrl.json").read_text())["step"] == "grpo"
    rows = metrics(rl)
    assert [r["step"] for r in rows] == [1, 2] and "reward/numeric/mean" in rows[0]
    assert [r["step"] for r in metrics(rl, kind="eval")] == [0, 2]
    sft_cfg = (root / "actor-models" / "tiny" / "run_config.yaml").read_text()
    assert "- arith" in sft_cfg  # step 1 trained on the arithmetic task
    assert f"Your chat model: {rl / 'actor'}" in res.stdout
