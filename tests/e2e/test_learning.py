"""The whole recipe learns, on a task a 2-layer random model masters in about a minute.

The task: "Question k: do you like <topic>?" answered "yes" or "no".
- step 1 (SFT) on answers that are "yes" 30% of the time and "no" 70%;
- step 2 (RM) on pairs that prefer "yes" to "no": held-out accuracy must reach 0.9 (chance 0.5);
- step 3 (PPO) against that reward model: the mean reward score of the last 3 iterations must
  beat the first 2 by at least 1.5 (measured: +2.4 to +3.0 on 3 seeds).

Each check fails if the math it rests on breaks: a flipped pairwise-loss sign sends the RM's
accuracy towards 0, a frozen value head or a lost advantage signal leaves PPO's reward flat, a
flipped policy-gradient sign makes it fall. All through the real `chatrl` command.
"""

from __future__ import annotations

import importlib.util
import json
import random

from ppo_helpers import PYTHON, chatrl, metrics, start, wait_all

TOPICS = ["rain", "the sea", "music", "bread", "trains", "gardens", "mountains", "cats", "books",
          "coffee", "snow", "rivers"]
FAST = ["--progress", "false", "--enable_tensorboard", "false", "--dtype", "fp32", "--seed", "7"]


def write_task(root):
    r = random.Random(0)
    sft, pref = root / "sft.jsonl", root / "pref.jsonl"
    with sft.open("w") as f, pref.open("w") as g:
        for i in range(400):
            prompt = f"Question {i}: do you like {r.choice(TOPICS)}?"
            said = "yes" if r.random() < 0.3 else "no"
            f.write(json.dumps({"prompt": prompt, "chosen": said, "rejected": "maybe"}) + "\n")
            g.write(json.dumps({"prompt": prompt, "chosen": "yes", "rejected": "no"}) + "\n")
    return sft, pref


def test_rm_accuracy_and_ppo_reward_rise(tmp_path):
    sft_data, pref = write_task(tmp_path)
    common = ["--model_name_or_path", "tiny", "--max_seq_len", "64", "--dropout", "0",
              "--per_device_train_batch_size", "8", *FAST]
    data = {"sft": ["--data_path", sft_data, "--data_split", "10,0,0", "--learning_rate", "3e-3",
                    "--max_steps", "30"],
            "rm": ["--data_path", pref, "--data_split", "0,10,0", "--learning_rate", "2e-3",
                   "--max_steps", "20"]}
    procs = {step: start([PYTHON, "-m", "chatrl", step, *common, *args, "--output_dir", tmp_path / step],
                         tmp_path, step) for step, args in data.items()}
    wait_all(procs, timeout=400)
    rm_eval = [r for r in metrics(tmp_path / "rm", kind="eval")][-1]
    assert rm_eval["accuracy"] >= 0.9, rm_eval
    assert rm_eval["chosen_score"] > rm_eval["rejected_score"] + 1.0, rm_eval

    # the second run trains the actor's top block only and samples with fp16 copies of its
    # frozen weights (--rollout-weights fp16); the third samples through llama.cpp with 8-bit
    # weights (where llama-cpp-python is installed, as in CI)
    runs = [("ppo", []), ("ppo-fp16", ["--rollout_weights", "fp16", "--actor_num_layers_unfrozen", "1"])]
    if importlib.util.find_spec("llama_cpp") is not None:
        runs.append(("ppo-llamacpp-q8", ["--generation_backend", "llamacpp", "--rollout_weights", "q8_0"]))
    for name, extra in runs:
        chatrl("ppo", "--actor_model_name_or_path", tmp_path / "sft" / "model",
               "--critic_model_name_or_path", tmp_path / "rm" / "model", "--data_path", pref,
               "--data_split", "0,0,10", "--per_device_generation_batch_size", "16",
               "--per_device_training_batch_size", "8", "--max_prompt_seq_len", "48",
               "--max_answer_seq_len", "6", "--actor_learning_rate", "2e-3",
               "--critic_learning_rate", "1e-3", "--num_warmup_steps", "0", "--lr_scheduler_type",
               "constant", "--max_steps", "12", *FAST, *extra, "--output_dir", tmp_path / name,
               timeout=400)
        rows = metrics(tmp_path / name)
        scores = [r["reward/score"] for r in rows]
        assert len(scores) == 12
        first, last = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
        assert last >= first + 1.5, (name, scores)  # measured gains 2.4-3.0 over 3 seeds
