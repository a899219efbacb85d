"""DeepSpeed-Chat's Python API: a script that knows only DeepSpeed-Chat's names runs PPO.

tests/e2e/scripts/dschat_api.py (its own process: one DeepSpeed process group per process) uses
`from chatrl import DeepSpeedRLHFEngine, DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised`,
an argparse.Namespace with DeepSpeed-Chat's step-3 flag names (some missing, some chatrl does not
know), and a DeepSpeed-Chat tokenizer (pad = EOS, right padding):
- keyword form: DeepSpeedRLHFEngine(actor_model_name_or_path=, critic_model_name_or_path=,
  tokenizer=, num_total_iters=, args=) + DeepSpeedPPOTrainer(engine=, args=), two iterations of
  generate_experience(right-padded tokenizer output) + train_rlhf(out) -> finite (actor, critic)
  losses, both models trained; the experience's prompts are each row's own tokens, left-padded to
  the longest prompt; DeepSpeed-Chat's experience keys are there;
- positional forms: DeepSpeedRLHFEngine(actor, critic, tok, args, n),
  DeepSpeedPPOTrainerUnsupervised(engine, args), generate_experience(prompt, prompt_att_mask, step)
  and with the {"prompt", "prompt_att_mask"} dict; train_unsupervised(inputs, unsup_coef) trains;
- engine.actor/ref/critic/reward (ref and reward frozen), engine.actor_ema with --enable_ema;
- names missing from the namespace take chatrl's defaults; given ones are used.
"""

from __future__ import annotations

import dataclasses
import json
import math

from ppo_helpers import PYTHON, SCRIPTS, run
from ppo_helpers import ppo_models  # noqa: F401  (session fixture)


def test_dschat_script_runs_ppo(ppo_models, tmp_path):
    from chatrl.config import PPOConfig

    actor, critic = ppo_models
    out = tmp_path / "facts.json"
    run([PYTHON, SCRIPTS / "dschat_api.py", actor, critic, out], timeout=300, cwd=tmp_path)
    facts = json.loads(out.read_text())

    assert facts["right_padded"]
    assert facts["parts"] == {"actor": "DeepSpeedEngine", "ref": "LlamaForCausalLM",
                              "critic": "DeepSpeedEngine", "reward": "RewardModel"}
    assert facts["frozen"] == {"ref": True, "reward": True}
    assert facts["has_ema"] and not facts["positional"]["has_ema"]
    assert set(facts["trainer_methods"]) == {"train", "eval", "get_overflow"}

    # missing names: chatrl's defaults; given names: used; explicit paths win over args
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    cfg = facts["config"]
    for k in ("kl_coef", "temperature", "top_p", "cliprange", "cliprange_value", "gamma", "lam",
              "clip_reward_value", "actor_lora_dim"):
        assert cfg[k] == defaults[k], k
    assert cfg["max_answer_seq_len"] == 10 and cfg["actor_learning_rate"] == 1e-3
    assert cfg["per_device_training_batch_size"] == 4
    assert (cfg["actor_model_name_or_path"], cfg["critic_model_name_or_path"]) == (actor, critic)

    # keyword form: two PPO iterations
    assert len(facts["iterations"]) == 2 and facts["all_finite"]
    for it in facts["iterations"]:
        assert it["finite"] and it["batch"] == [4] * 7
        assert math.isfinite(it["actor_loss"]) and math.isfinite(it["critic_loss"])
        assert it["critic_loss"] > 0
        assert it["prompts_ok"], "prompts are not the rows' tokens, left-padded"
        assert it["prompt_len"] == facts["longest_prompt"]
        assert 1 <= it["answer_len"] <= 10
    assert facts["actor_moved"] > 0 and facts["critic_moved"] > 0

    # positional forms + PTX
    pos = facts["positional"]
    assert pos["batch"] == pos["batch2"] == 2 and pos["prompt_equal"]
    assert math.isfinite(pos["actor_loss"]) and math.isfinite(pos["critic_loss"])
    assert pos["config_batch"] == 2
    for k in ("unsup_loss", "unsup_loss2"):
        assert math.isfinite(pos[k]) and 0 < pos[k] < 20, (k, pos[k])
    assert pos["unsup_moved"] > 0
