"""A DeepSpeed-Chat step-3 style script, written only against DeepSpeed-Chat's names (run by
tests/e2e/test_api.py in its own process: one DeepSpeed process group per process).

    python dschat_api.py ACTOR_DIR CRITIC_DIR OUT.json

Writes OUT.json with what the test checks (losses, shapes, defaults, which weights moved).
"""

import argparse
import json
import math
import sys

import torch
from transformers import AutoTokenizer

from chatrl import DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised, DeepSpeedRLHFEngine

PROMPTS = ["Human: Tell me about the ocean and the rain, please. Assistant:",
           "Human: Hi Assistant:",
           "Human: What do you think of rain? Assistant:",
           "Human: Describe a mountain. Assistant:"]


def dschat_args(actor, critic, **over):
    """What DeepSpeed-Chat's step-3 main.py parses (a subset: the RL knobs it hard-codes, the
    dtype and the LoRA flags are left out, so chatrl's defaults apply), plus names chatrl ignores."""
    ns = dict(
        data_path=["local/jsonfile"], data_split="2,4,4", data_output_path="/tmp/data_files",
        unsupervised_dataset_name=None, unsupervised_dataset_config_name=None, unsup_coef=27.8,
        actor_model_name_or_path=actor, critic_model_name_or_path=critic,
        num_padding_at_beginning=1, per_device_generation_batch_size=4,
        per_device_training_batch_size=4, generation_batches=1, ppo_epochs=1,
        max_prompt_seq_len=64, max_answer_seq_len=10, actor_learning_rate=1e-3,
        critic_learning_rate=1e-3, actor_weight_decay=0.0, critic_weight_decay=0.0,
        num_train_epochs=1, lr_scheduler_type="cosine", gradient_accumulation_steps=1,
        num_warmup_steps=0, output_dir="/tmp/unused-output", seed=1234,
        preprocessing_num_workers=None, local_rank=-1, enable_hybrid_engine=True,
        unpin_actor_parameters=False, release_inference_cache=False, inference_tp_size=1,
        tp_gather_partition_size=8, offload=False, offload_reference_model=False,
        actor_zero_stage=0, critic_zero_stage=0, actor_gradient_checkpointing=False,
        critic_gradient_checkpointing=False, actor_dropout=0.0, critic_dropout=0.0,
        enable_ema=False, enable_mixed_precision_lora=False, compute_fp32_loss=False,
        enable_tensorboard=False, tensorboard_path="step3_tensorboard", print_answers=False,
        print_answers_interval=1, add_eot_token=False, end_of_conversation_token="<|endoftext|>",
        enable_test_mode=False, test_stop_step=0, deepspeed=True, deepspeed_config=None,
        deepscale=False, deepscale_config=None, global_rank=0,
    )
    ns.update(over)
    return argparse.Namespace(**ns)


def finite(t):
    return bool(torch.isfinite(torch.as_tensor(t)).all())


def weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def moved(before, module):
    return sum(int(not torch.equal(before[n], p.detach())) for n, p in module.named_parameters())


def main():
    actor, critic, out_path = sys.argv[1:4]
    facts = {}

    # DeepSpeed-Chat's tokenizer set-up: pad = EOS, right padding; the batch is made before the
    # engine exists, i.e. right-padded
    tok = AutoTokenizer.from_pretrained(actor)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    facts["right_padded"] = bool((batch["attention_mask"][:, -1] == 0).any())
    real = [[t for t, m in zip(ids, mask) if m] for ids, mask in
            zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]

    # ---- keyword form: engine + trainer, a few iterations
    args = dschat_args(None, None, enable_ema=True)
    engine = DeepSpeedRLHFEngine(actor_model_name_or_path=actor, critic_model_name_or_path=critic,
                                 tokenizer=tok, num_total_iters=3, args=args)
    trainer = DeepSpeedPPOTrainer(engine=engine, args=args)
    facts["parts"] = {name: type(getattr(engine, name)).__name__
                      for name in ("actor", "ref", "critic", "reward")}
    facts["frozen"] = {name: not any(p.requires_grad for p in getattr(engine, name).parameters())
                       for name in ("ref", "reward")}
    facts["has_ema"] = engine.actor_ema is not None
    facts["config"] = {k: getattr(engine.config, k) for k in (
        "kl_coef", "temperature", "top_p", "cliprange", "cliprange_value", "gamma", "lam",
        "clip_reward_value", "actor_lora_dim", "max_answer_seq_len", "actor_learning_rate",
        "per_device_training_batch_size", "actor_model_name_or_path", "critic_model_name_or_path")}
    actor_before, critic_before = weights(engine.actor.module), weights(engine.critic.module)
    iters = []
    for step in range(2):
        out = trainer.generate_experience(batch)
        exp = {k: out[k] for k in ("prompts", "logprobs", "ref_logprobs", "value", "rewards",
                                   "input_ids", "attention_mask")}
        actor_loss, critic_loss = trainer.train_rlhf(out)
        prompts = exp["prompts"]
        P = prompts.shape[1]
        pmask = exp["attention_mask"][:, :P]
        iters.append({
            "actor_loss": float(actor_loss), "critic_loss": float(critic_loss),
            "finite": all(finite(v) for v in exp.values()),
            "batch": [int(v.shape[0]) for v in exp.values()],
            "prompt_len": P,
            # each prompt is the row's real tokens, left-padded (ends at the last prompt column)
            "prompts_ok": all(prompts[i][pmask[i].bool()].tolist() == real[i] and bool(pmask[i, -1])
                              for i in range(len(real))),
            "answer_len": int(exp["input_ids"].shape[1] - P),
        })
    facts["iterations"] = iters
    facts["longest_prompt"] = max(len(r) for r in real)
    facts["actor_moved"] = moved(actor_before, engine.actor.module)
    facts["critic_moved"] = moved(critic_before, engine.critic.module)
    facts["trainer_methods"] = [m for m in ("train", "eval", "get_overflow") if callable(getattr(trainer, m, None))]
    del engine, trainer

    # ---- DeepSpeed-Chat's positional forms, the unsupervised trainer, prompts as its collator
    # gives them ({"prompt", "prompt_att_mask"}, left-padded)
    args = dschat_args(actor, critic, per_device_training_batch_size=2, unsup_coef=0.5)
    engine = DeepSpeedRLHFEngine(actor, critic, tok, args, 2)
    trainer = DeepSpeedPPOTrainerUnsupervised(engine, args)
    tok.padding_side = "left"
    left = tok(PROMPTS[:2], padding=True, return_tensors="pt")
    batch_prompt = {"prompt": left["input_ids"], "prompt_att_mask": left["attention_mask"]}
    out = trainer.generate_experience(batch_prompt["prompt"], batch_prompt["prompt_att_mask"], 0)
    actor_loss, critic_loss = trainer.train_rlhf(out)
    out2 = trainer.generate_experience(batch_prompt)  # the dict itself works too
    before = weights(engine.actor.module)
    unsup = tok(["The quick brown fox jumps over the lazy dog.", "Rain is lovely."],
                padding=True, return_tensors="pt")
    unsup_with_labels = dict(unsup, labels=unsup["input_ids"].masked_fill(unsup["attention_mask"] == 0, -100))
    unsup_loss = trainer.train_unsupervised(unsup_with_labels, args.unsup_coef)
    unsup_loss2 = trainer.train_unsupervised(dict(unsup), args.unsup_coef)  # labels derived
    facts["positional"] = {
        "actor_loss": float(actor_loss), "critic_loss": float(critic_loss),
        "batch": int(out["input_ids"].shape[0]), "batch2": int(out2["input_ids"].shape[0]),
        "prompt_equal": bool(torch.equal(out["prompts"], left["input_ids"])),
        "unsup_loss": float(unsup_loss), "unsup_loss2": float(unsup_loss2),
        "unsup_moved": moved(before, engine.actor.module),
        "has_ema": engine.actor_ema is not None,
        "config_batch": engine.config.per_device_training_batch_size,
    }
    facts["all_finite"] = all(math.isfinite(v) for it in iters for v in (it["actor_loss"], it["critic_loss"]))
    with open(out_path, "w") as f:
        json.dump(facts, f, indent=1)


if __name__ == "__main__":
    main()
