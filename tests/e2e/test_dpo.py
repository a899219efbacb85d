"""`chatrl dpo` through the real CLI on tiny-opt and the demo preference pairs (step 2's slice).

- Full fine-tuning, 20 steps at learning rate 1e-3: the first loss is ln 2 exactly (the policy is
  its reference and dropout is off); on the HELD-OUT pairs (topics never seen in training) the
  loss falls from ln 2 by more than 0.15, the implicit-reward accuracy reaches 0.75 (it starts at
  0: every margin is 0) and the mean margin exceeds 0.3 (measured: a fall of 0.20, 0.825, 0.52).
- The saved folder loads with plain Transformers and reproduces that final evaluation: the same
  loss, accuracy and margin from the reloaded weights against the starting model.
- LoRA (rank 8, --only-optimize-lora, 20 steps): the held-out loss falls by more than 0.05 and
  accuracy reaches 0.6 (measured: 0.09, 0.75); the saved folder is a plain merged model.
The thresholds leave room for other CPUs' round-off; the runs are seeded.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ppo_helpers import PYTHON, kill_group, logs, metrics, start, state_dict_of, wait_all

LN2 = math.log(2.0)
ARGS = ["--model_name_or_path", "tiny-opt", "--max_seq_len", "128", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--eval_iters", "10", "--eval_interval", "10",
        "--max_steps", "20", "--num_warmup_steps", "0", "--progress", "false",
        "--enable_tensorboard", "false", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    cmds = {"full": [*ARGS, "--learning_rate", "1e-3"],
            "lora": [*ARGS, "--lora_dim", "8", "--only_optimize_lora", "--lora_learning_rate", "1e-2"]}
    procs = {n: start([PYTHON, "-m", "chatrl", "dpo", *c, "--output_dir", tmp / n], tmp, n)
             for n, c in cmds.items()}
    wait_all(procs)
    return SimpleNamespace(full=tmp / "full", lora=tmp / "lora", stderr=logs(procs["full"]))


def test_dpo_learns_the_held_out_preference(runs):
    train, evals = metrics(runs.full, "train"), metrics(runs.full, "eval")
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["loss"] == pytest.approx(LN2, abs=1e-6)  # policy == reference, no dropout
    assert train[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    final = evals[-1]
    assert final["step"] == 20 and final["eval/pairs"] == 40
    assert final["eval/loss"] < LN2 - 0.15, final
    assert final["accuracy"] >= 0.75, final
    assert final["margin"] > 0.3, final
    assert sum(r["loss"] for r in train[-5:]) / 5 < LN2 - 0.1
    assert "dpo: done" in runs.stderr


def test_saved_model_loads_and_reproduces_the_final_evaluation(runs):
    from transformers import AutoModelForCausalLM

    from chatrl import config as C
    from chatrl.data import collate_pairs
    from chatrl.models import load_causal_lm, load_tokenizer, read_meta, resolve_model_path
    from chatrl.rl import dpo_loss
    from chatrl.steps import common
    from chatrl.steps.dpo import response_logps

    folder = runs.full / "model"
    assert read_meta(folder)["step"] == "dpo"
    policy = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = load_tokenizer(str(folder))
    cfg = C.build_config(C.DPOConfig, files=[runs.full / "run_config.yaml"], section="dpo")
    _, eval_ds, _ = common.step_datasets(cfg, tok, common.template_for(cfg, tok), "rm", 2, cfg.max_seq_len)
    assert len(eval_ds) == 40
    reference = load_causal_lm(resolve_model_path("tiny-opt"), tokenizer=tok).eval()
    rows = [eval_ds[i] for i in range(len(eval_ds))]
    batch = collate_pairs(rows, tok.pad_token_id)
    prompt_len = torch.tensor([r["prompt_len"] for r in rows] * 2)
    with torch.no_grad():
        pi, ref = (response_logps(m, batch, prompt_len, torch.device("cpu")) for m in (policy, reference))
    n = len(rows)
    loss, stats = dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta=cfg.beta)
    final = metrics(runs.full, "eval")[-1]
    assert loss.item() == pytest.approx(final["eval/loss"], abs=1e-5)
    assert stats["reward_accuracy"].item() == pytest.approx(final["accuracy"], abs=1e-6)
    assert stats["margin"].item() == pytest.approx(final["margin"], abs=1e-5)


def test_dpo_with_lora(runs):
    from transformers import AutoModelForCausalLM

    train, final = metrics(runs.lora, "train"), metrics(runs.lora, "eval")[-1]
    assert len(train) == 20 and train[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert final["eval/loss"] < LN2 - 0.05 and final["accuracy"] >= 0.6, final
    saved = state_dict_of(runs.lora / "model")
    assert saved and not [k for k in saved if "lora_" in k or "base_layer" in k]
    model, info = AutoModelForCausalLM.from_pretrained(runs.lora / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
