"""DeepSpeed-Chat's Python API over chatrl's step-3 pieces.

    engine = DeepSpeedRLHFEngine(actor_model_name_or_path=..., critic_model_name_or_path=...,
                                 tokenizer=tokenizer, num_total_iters=n, args=args)
    trainer = DeepSpeedPPOTrainer(engine=engine, args=args)
    for prompt_batch in prompt_train_dataloader:
        out = trainer.generate_experience(prompt_batch)
        actor_loss, critic_loss = trainer.train_rlhf(out)

DeepSpeed-Chat's own positional forms work too: `DeepSpeedRLHFEngine(actor_path, critic_path,
tokenizer, args, num_total_iters)`, `DeepSpeedPPOTrainer(rlhf_engine, args)`,
`generate_experience(prompts, mask, step)`. `args` is any attribute object with DeepSpeed-Chat's
step-3 names; it is translated once, here, into a typed PPOConfig (missing names take defaults).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .config import PPOConfig, from_namespace
from .engine import ds
from .models.load import configure_tokenizer

__all__ = ["DeepSpeedRLHFEngine", "DeepSpeedPPOTrainer", "DeepSpeedPPOTrainerUnsupervised"]


def _ppo_config(args, **paths) -> PPOConfig:
    cfg = from_namespace(PPOConfig, args if args is not None else {})
    return dataclasses.replace(cfg, **{k: v for k, v in paths.items() if v is not None})


class DeepSpeedRLHFEngine:
    """Actor (+ hybrid engine), reference, critic, reward model (+ actor_ema)."""

    def __init__(self, actor_model_name_or_path=None, critic_model_name_or_path=None, tokenizer=None,
                 args=None, num_total_iters=None):
        # DeepSpeed-Chat passes (..., tokenizer, args, num_total_iters); tolerate them swapped.
        if isinstance(args, int) and not isinstance(num_total_iters, int):
            args, num_total_iters = num_total_iters, args
        from .steps.ppo import build_models

        ds.init_distributed()
        self.args = args
        self.config = _ppo_config(args, actor_model_name_or_path=actor_model_name_or_path,
                                  critic_model_name_or_path=critic_model_name_or_path)
        if tokenizer is None:
            from .models import load_tokenizer, resolve_model_path

            tokenizer = load_tokenizer(resolve_model_path(self.config.actor_model_name_or_path))
        # A copy: the caller's tokenizer (often pad == EOS, right padding) stays as it was.
        self.tokenizer = configure_tokenizer(copy.deepcopy(tokenizer), padding_side="left")
        ds.seed_everything(self.config.seed)
        self.models = build_models(self.config, self.tokenizer, int(num_total_iters or 1),
                                   ds.resolve_dtype(self.config.dtype))
        self.actor = self.models.actor
        self.ref = self.models.ref
        self.critic = self.models.critic
        self.reward = self.models.reward

    @property
    def actor_ema(self):
        return self.models.actor_ema


def _prompt_tensors(prompts, mask, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a tokenizer's output, DeepSpeed-Chat's {"prompt", "prompt_att_mask"}, chatrl's
    collate_prompts batch, or (ids, mask) tensors; return LEFT-padded ids and mask."""
    if isinstance(prompts, dict) or hasattr(prompts, "keys"):
        ids = prompts.get("input_ids", prompts.get("prompt"))
        mask = prompts.get("attention_mask", prompts.get("prompt_att_mask", mask))
    else:
        ids = prompts
    if ids is None:
        raise ValueError("generate_experience needs prompt token ids: a tokenizer output with "
                         "input_ids, or {'prompt': ids, 'prompt_att_mask': mask}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    # Right-padded rows (a real token after a pad) are re-packed to the left.
    if bool((mask[:, :-1] > mask[:, 1:]).any()):  # a pad after a real token: right padding
        lens = mask.sum(1)
        width = int(lens.max())
        new_ids = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype)
        new_mask = torch.zeros((ids.shape[0], width), dtype=mask.dtype)
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()]
            new_ids[i, width - len(row):] = row
            new_mask[i, width - len(row):] = 1
        ids, mask = new_ids, new_mask
    return ids, mask


class DeepSpeedPPOTrainer:
    def __init__(self, engine=None, args=None, rlhf_engine=None):
        from .steps.ppo import PPOTrainer

        engine = engine or rlhf_engine
        if engine is None:
            raise ValueError("DeepSpeedPPOTrainer needs the DeepSpeedRLHFEngine (engine=...)")
        self.rlhf_engine = engine
        cfg = engine.config if args is None else _ppo_config(
            args, actor_model_name_or_path=engine.config.actor_model_name_or_path,
            critic_model_name_or_path=engine.config.critic_model_name_or_path)
        self._trainer = PPOTrainer(engine.models, cfg)
        self.tokenizer = engine.tokenizer

    @property
    def stats(self) -> dict:
        """Metrics of the last generate_experience / train_rlhf call."""
        return self._trainer.last_stats

    # DeepSpeed-Chat's trainer attributes
    @property
    def actor_model(self):
        return self.rlhf_engine.actor

    @property
    def critic_model(self):
        return self.rlhf_engine.critic

    @property
    def ref_model(self):
        return self.rlhf_engine.ref

    @property
    def reward_model(self):
        return self.rlhf_engine.reward

    @property
    def generate_time(self) -> float:
        return self._trainer.last_stats.get("time/generate", 0.0)

    def generate_experience(self, prompts, mask=None, step=None):
        ids, mask = _prompt_tensors(prompts, mask, self.tokenizer.pad_token_id)
        return self._trainer.generate_experience(ids, mask, step)

    def train_rlhf(self, inputs):
        return self._trainer.train_rlhf(inputs)

    def train(self):
        self.rlhf_engine.actor.train()
        self.rlhf_engine.critic.train()

    def eval(self):
        self.rlhf_engine.actor.eval()
        self.rlhf_engine.critic.eval()

    def get_overflow(self):
        """(actor, critic) fp16 overflow flags, as DeepSpeed-Chat's scripts read them."""
        return (bool(getattr(self.rlhf_engine.actor.optimizer, "overflow", False)),
                bool(getattr(self.rlhf_engine.critic.optimizer, "overflow", False)))


class DeepSpeedPPOTrainerUnsupervised(DeepSpeedPPOTrainer):
    def train_unsupervised(self, inputs, unsup_coef):
        """PTX step: inputs hold input_ids, attention_mask and labels (-100 = ignored)."""
        batch = dict(inputs)
        if "labels" not in batch:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return self._trainer.train_unsupervised(batch, unsup_coef)
