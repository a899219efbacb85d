"""Dropout in step 3 (PPO) and DPO: off by default for every model, on when a flag asks for it.

OPT and GPT-2 ship with dropout 0.1. With it on, the training forward of PPO is a different
(random) function from the rollout's policy, so the first mini-batch's ratio is not 1 and the
clip acts on noise; DPO's policy differs from its reference before any update. TRL turns dropout
off in both; chatrl does too (--actor-dropout, --critic-dropout and DPO's --dropout turn it on).

Through the real CLI, tiny-opt and tiny-gpt2 in both roles:
- PPO, defaults: the first micro-batch has ratio 1 and approximate KL 0 (fp32 round-off only);
  the saved actor and critic record dropout 0;
- PPO, --actor-dropout 0.1 --critic-dropout 0.1: the same first micro-batch now shows the noise
  (the flags reach the models, which train in training mode);
- DPO, defaults, learning rate 1e-9 and an evaluation after every step: every loss is ln 2, the
  policy equalling its reference, before and after the evaluations switch modes;
- DPO, --dropout 0.1: the first loss is not ln 2.
In-process (module level): after a rollout and an update, actor and critic are in training mode
and deterministic; reference and reward model are in eval mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ppo_helpers import PPO_FAST, PYTHON, init_in_process, metrics, one_thread, start, wait_all

DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "attn_pdrop", "resid_pdrop",
                "embd_pdrop", "summary_first_dropout")
LN2 = math.log(2.0)


def ppo_args(actor: str, critic: str, out: Path, *extra) -> list:
    args = list(PPO_FAST)
    for flag, value in (("--per_device_generation_batch_size", "2"), ("--max_answer_seq_len", "8")):
        args[args.index(flag) + 1] = value
    return [PYTHON, "-m", "chatrl", "ppo", "--actor_model_name_or_path", actor,
            "--critic_model_name_or_path", critic, "--output_dir", out, *args, "--max_steps", "1",
            "--ppo_epochs", "1", "--allow-untrained-reward-head", *extra]


def dpo_args(model: str, out: Path, *extra) -> list:
    return [PYTHON, "-m", "chatrl", "dpo", "--model_name_or_path", model, "--output_dir", out,
            "--max_seq_len", "96", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--eval_iters", "2", "--progress", "false", "--enable_tensorboard", "false", "--dtype", "fp32",
            *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropout")
    cmds = {
        "ppo_default": ppo_args("tiny-opt", "tiny-gpt2", tmp / "ppo_default"),
        "ppo_on": ppo_args("tiny-gpt2", "tiny-opt", tmp / "ppo_on", "--actor_dropout", "0.1",
                           "--critic_dropout", "0.1"),
        "dpo_default": dpo_args("tiny-opt", tmp / "dpo_default", "--learning_rate", "1e-9",
                                "--max_steps", "3", "--eval_interval", "1"),
        "dpo_on": dpo_args("tiny-gpt2", tmp / "dpo_on", "--max_steps", "1", "--dropout", "0.1"),
    }
    # two at a time: each run is mostly start-up
    names = list(cmds)
    for pair in (names[:2], names[2:]):
        procs = {n: start(cmds[n], tmp, n) for n in pair}
        wait_all(procs)
    return SimpleNamespace(**{n: tmp / n for n in cmds})


def dropouts(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {k: config[k] for k in DROPOUT_KEYS if k in config}


def test_ppo_dropout_is_off_by_default(runs):
    first = metrics(runs.ppo_default)[0]  # one rollout of 2, one mini-batch of 2: its own stats
    assert first["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/approx_kl"] < 1e-10 and first["policy/clipfrac"] == 0.0
    for model in ("actor", "critic"):
        found = dropouts(runs.ppo_default / model)
        assert found and all(v == 0 for v in found.values()), (model, found)


def test_ppo_dropout_flags_turn_it_on(runs):
    first = metrics(runs.ppo_on)[0]
    # the rollout samples with dropout off (generation mode), the update sees a dropped-out policy
    assert first["policy/approx_kl"] > 1e-5, first
    for model in ("actor", "critic"):
        found = dropouts(runs.ppo_on / model)
        assert found and all(v == 0.1 for v in found.values()), (model, found)


def test_dpo_dropout_is_off_by_default(runs):
    train, evals = metrics(runs.dpo_default, "train"), metrics(runs.dpo_default, "eval")
    assert [r["step"] for r in train] == [1, 2, 3] and len(evals) >= 3
    # learning rate 1e-9: the policy stays its reference, so h = 0 and the loss is ln 2 exactly,
    # also after each evaluation switched the model to eval mode and back
    for r in train + evals:
        loss = r.get("loss", r.get("eval/loss"))
        assert loss == pytest.approx(LN2, abs=1e-5), r
    found = dropouts(runs.dpo_default / "model")
    assert found and all(v == 0 for v in found.values()), found


def test_dpo_dropout_flag_turns_it_on(runs):
    first = metrics(runs.dpo_on)[0]
    assert abs(first["loss"] - LN2) > 1e-3, first
    found = dropouts(runs.dpo_on / "model")
    assert found and all(v == 0.1 for v in found.values()), found


def prompt_batch(tok, texts):
    from chatrl.data import collate_prompts

    rows = [{"prompt_input_ids": tok(tok.apply_chat_template([{"role": "user", "content": t}],
                                                              add_generation_prompt=True, tokenize=False),
                                     add_special_tokens=False)["input_ids"]} for t in texts]
    return collate_prompts(rows, tok.pad_token_id)


def test_ppo_models_modes_and_determinism(tmp_path):
    """Module level: the default PPO config builds dropout-free models; after a rollout and an
    update the trained ones are in training mode (so --*-dropout would act) yet deterministic."""
    from chatrl.config import PPOConfig
    from chatrl.models import load_tokenizer, resolve_model_path
    from chatrl.steps.ppo import PPOTrainer, build_models

    path = resolve_model_path("tiny-opt")
    init_in_process()
    cfg = PPOConfig(actor_model_name_or_path=path, critic_model_name_or_path=path,
                    output_dir=str(tmp_path), per_device_generation_batch_size=4,
                    per_device_training_batch_size=4, max_answer_seq_len=6, num_warmup_steps=0,
                    dtype="fp32", allow_untrained_reward_head=True)
    assert cfg.actor_dropout == 0.0 and cfg.critic_dropout == 0.0
    tok = load_tokenizer(path, padding_side="left")
    with one_thread():
        models = build_models(cfg, tok, 10, "fp32")
        trainer = PPOTrainer(models, cfg)
        batch = prompt_batch(tok, ["Tell me about the ocean.", "Hi", "What do you think of rain?",
                                   "Describe a tall mountain."])
        torch.manual_seed(0)
        exp = trainer.generate_experience(batch["input_ids"], batch["attention_mask"])
        trainer.train_rlhf(exp)
        seq, mask = exp.sequences, exp.attention_mask
        for name in ("actor", "critic"):
            module = getattr(models, name).module
            assert module.training, f"the {name} trains in eval mode"
            with torch.no_grad():
                a, b = (module(seq, mask) if name == "critic" else
                        module(input_ids=seq, attention_mask=mask, use_cache=False).logits
                        for _ in range(2))
            assert torch.equal(a, b), f"the {name}'s training forward is random (dropout on)"
        for name in ("ref", "reward"):
            assert not getattr(models, name).training, name
