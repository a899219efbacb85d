"""Step 3 — RLHF with PPO: rollout -> KL-shaped rewards -> GAE -> PPO epochs -> log/checkpoint.

Per iteration (SPEC section 1):
  1. rollout: sample answers from the actor in generation mode (temperature / top-p, not greedy);
     the actor's log-probs come from the generation logits (no second actor forward), then one
     forward each of the reference, the critic and the reward model over prompt + answer;
  2. rewards:   r_t = -kl_coef * KL_t  (+ clip(score, -c, c) at the answer's last token, its EOS);
  3. GAE:       advantages (whitened by default), returns = advantages + values;
  4. PPO epochs over mini-batches: clipped policy loss, clipped value loss, token means over the
     answer tokens (EOS included, padding and anything after the EOS excluded); optional PTX;
  5. EMA, KL controller, metrics, sample answers, checkpoint.

Shapes: prompts are left-padded to the batch's longest prompt P; answers are right-padded to the
batch's longest answer R (never to a fixed length). `action_mask` [B, R] marks answer tokens up to
and including the first EOS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..data import collate_prompts
from ..engine import checkpoint as ckpt
from ..engine import ds
from ..engine.flops import forward_flops, matmul_params, train_flops
from ..engine.hybrid import GenerationParams
from ..engine.rlhf import ModelSpec, RLHFModels
from ..logging import progress, write_line
from ..models import resolve_model_path
from ..models.load import accepts_logits_to_keep, model_inputs
from ..models.reward import RewardModel, gather_last
from ..rl import (AdaptiveKLController, FixedKLController, RunningMoments, entropy_from_logits,
                  gae_advantages, gather_logprobs, kl_penalty, kl_shaped_rewards, masked_mean,
                  masked_moments, policy_loss, response_mask, sft_loss, value_loss,
                  whiten_from_moments)
from . import common


@dataclass
class Experience:
    """One rollout batch. Answer-aligned tensors are [B, R]; `sequences` is [B, P + R]."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows `idx`, with columns no row of them uses trimmed (left prompt pad, right answer pad)."""
        sub = {f.name: (getattr(self, f.name)[idx] if isinstance(getattr(self, f.name), torch.Tensor)
                        else getattr(self, f.name)) for f in fields(self)}
        P = self.prompt_len
        used = sub["attention_mask"][:, :P].any(0).nonzero()
        start = int(used[0]) if len(used) else P - 1
        start = min(start, P - 1)
        ans = sub["action_mask"].any(0).nonzero()
        end = int(ans[-1]) + 1 if len(ans) else 1
        out = {}
        for k, v in sub.items():
            if k in ("sequences", "attention_mask"):
                out[k] = v[:, start:P + end]
            elif isinstance(v, torch.Tensor) and v.dim() == 2:
                out[k] = v[:, :end]
            else:
                out[k] = v
        out["prompt_len"] = P - start
        return Experience(**out)

    _DSCHAT_KEYS = {"prompts": None, "logprobs": "logprobs", "ref_logprobs": "ref_logprobs",
                    "value": "values", "rewards": "rewards", "input_ids": "sequences",
                    "attention_mask": "attention_mask"}

    def __getitem__(self, key: str):
        """DeepSpeed-Chat's experience keys (`out["value"]`, `out["prompts"]`, ...)."""
        if key == "prompts":
            return self.sequences[:, :self.prompt_len]
        if key in self._DSCHAT_KEYS:
            return getattr(self, self._DSCHAT_KEYS[key])
        return getattr(self, key)

    def keys(self):
        return [*self._DSCHAT_KEYS, "action_mask", "advantages", "returns", "scores", "prompt_len"]

    def items(self):
        """(key, tensor) pairs, so DeepSpeed-Chat's MiniDataset can slice an experience."""
        for k in self.keys():
            v = self[k]
            yield k, (torch.full((self.batch_size,), v) if k == "prompt_len" else v)

    def __len__(self) -> int:
        return self.batch_size

    @classmethod
    def from_dict(cls, d: dict) -> "Experience":
        """Rebuild from items() output (possibly sliced along the batch)."""
        p = d["prompt_len"]
        p = int(p.flatten()[0]) if isinstance(p, torch.Tensor) else int(p)
        return cls(sequences=d["input_ids"], attention_mask=d["attention_mask"],
                   action_mask=d["action_mask"], prompt_len=p, logprobs=d["logprobs"],
                   ref_logprobs=d["ref_logprobs"], values=d["value"], scores=d["scores"],
                   rewards=d["rewards"], advantages=d["advantages"], returns=d["returns"])

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]


def answer_logits(model, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The model's logits for each answer token: forward over prompt + answer, sliced. [B, R, V]

    In the model's dtype and not yet divided by the rollout temperature: pass `temperature` to
    gather_logprobs / entropy_from_logits, which divide after upcasting to fp32."""
    answer_len = seq.shape[1] - prompt_len
    if accepts_logits_to_keep(model):
        # The vocabulary projection only where an answer token is predicted (the last R + 1
        # positions; the final one predicts nothing): the prompt's logits are never needed.
        out = model(**model_inputs(model, seq, mask), use_cache=False, logits_to_keep=answer_len + 1)
        logits = out.logits[:, :-1]
    else:
        out = model(**model_inputs(model, seq, mask), use_cache=False)
        logits = out.logits[:, prompt_len - 1:-1]
    return logits


def answer_values(critic, seq, mask, prompt_len: int) -> torch.Tensor:
    """Critic value of the state before each answer token. [B, R]"""
    return critic(seq, mask)[:, prompt_len - 1:-1]


class PPOTrainer:
    """generate_experience(prompts) and train_rlhf(experience) over an RLHFModels bundle.

    `cfg` is a PPOConfig; every hyper-parameter is read from it here and nowhere else.
    """

    def __init__(self, models: RLHFModels, cfg):
        self.models = models
        self.cfg = cfg
        self.tokenizer = models.tokenizer
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                       if cfg.adaptive_kl else FixedKLController(cfg.kl_coef))
        self.gen_params = GenerationParams(
            max_new_tokens=cfg.max_answer_seq_len, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id)
        self.last_stats: dict = {}
        self.device = ds.device()
        # Old log-probs: from the generation logits (no extra forward) when the actor trains in
        # fp32, where both agree to ~1e-6; from a forward of the training module otherwise
        # (bf16/fp16 generation with a KV cache rounds differently from a full forward).
        rec = cfg.recompute_old_logprobs
        self.recompute_old_logprobs = (models.dtype != "fp32") if rec is None else bool(rec)
        self.reward_moments = RunningMoments() if cfg.normalize_reward else None
        self._pre_update = False  # no optimizer step since the last rollout (see train_rlhf)

    # ------------------------------------------------------------------ 1-3. experience
    @torch.no_grad()
    def generate_experience(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            step: int | None = None) -> Experience:
        """One rollout batch, scored, with advantages whitened over it (on all ranks together).

        run_ppo collects `generation_batches` of these with make_experience and whitens them
        together (whiten_experiences), so the statistics span the whole update."""
        exp = self.make_experience(input_ids, attention_mask)
        if self.cfg.whiten_advantages:
            whiten_experiences([exp])
        return exp

    @torch.no_grad()
    def make_experience(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Experience:
        """Rollout, old log-probs, reference log-probs, values, scores, KL-shaped rewards and GAE
        (advantages not yet whitened)."""
        cfg, m, dev = self.cfg, self.models, self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        P = input_ids.shape[1]
        t0 = time.time()
        # 1. rollout (generation mode: gathered / merged weights, KV cache, no dropout)
        gen = m.hybrid.generate(input_ids, attention_mask, self.gen_params, return_logprobs=True)
        t_gen = time.time() - t0
        answer = gen.sequences[:, P:]
        action_mask = response_mask(answer, self.tokenizer.eos_token_id)
        R = max(int(action_mask.sum(1).max().item()), 1)
        answer, action_mask = answer[:, :R], action_mask[:, :R]
        answer = torch.where(action_mask.bool(), answer, torch.full_like(answer, self.tokenizer.pad_token_id))
        seq = torch.cat([input_ids, answer], dim=1)
        mask = torch.cat([attention_mask, action_mask.long()], dim=1)
        # Scoring forwards: (actor,) reference, critic, reward.
        t1 = time.time()
        gen_logprobs = gen.logprobs[:, :R].float() * action_mask
        extra = {}
        if self.recompute_old_logprobs:
            logprobs = self._logprobs(m.actor, seq, mask, P, eval_mode=True) * action_mask
            gap = (logprobs - gen_logprobs).abs() * action_mask
            extra = {"rollout/logprob_gap": (gap.sum() / action_mask.sum().clamp(min=1)).item(),
                     "rollout/logprob_gap_max": gap.max().item()}
        else:
            logprobs = gen_logprobs
        ref_logprobs = self._logprobs(m.ref, seq, mask, P) * action_mask
        m.critic.eval()  # old values without dropout
        values = answer_values(m.critic, seq, mask, P) * action_mask
        m.critic.train()
        raw_scores = self._score(seq, mask)
        ended = ended_with_eos(answer, action_mask, self.tokenizer.eos_token_id)
        scores = self._shape_scores(raw_scores, ended)
        # 2. KL-shaped rewards and 3. GAE
        rewards = kl_shaped_rewards(logprobs, ref_logprobs, scores, action_mask,
                                    kl_coef=self.kl_ctl.value, clip_reward=cfg.clip_reward_value,
                                    estimator=cfg.kl_estimator)
        advantages, returns = gae_advantages(rewards, values, action_mask, cfg.gamma, cfg.lam)
        t_score = time.time() - t1
        kl_tok = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * action_mask
        n_tokens = action_mask.sum()
        self._pre_update = True
        self.last_stats = {
            "reward/score": raw_scores.mean().item(),
            "reward/shaped_score": scores.mean().item(),
            "reward/total": (rewards.sum(1)).mean().item(),
            "policy/kl": kl_tok.sum(1).mean().item(),
            "policy/kl_coef": self.kl_ctl.value,
            "response/length": action_mask.sum(1).mean().item(),
            "response/eos_rate": ended.float().mean().item(),
            "time/generate": t_gen, "time/score": t_score,
            "tokens/generated": n_tokens.item(), "tokens/prompt": attention_mask.sum().item(),
            **extra,
        }
        return Experience(seq, mask, action_mask, P, logprobs, ref_logprobs, values, scores, rewards,
                          advantages, returns)

    def _shape_scores(self, scores: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Reward-model scores -> the scores PPO optimises: optionally normalised by their running
        mean and std (statistics all-reduced, so every rank normalises alike), minus
        --missing-eos-penalty for answers cut at the length limit."""
        if self.reward_moments is not None:
            mom = ds.all_reduce_sum(torch.stack([torch.tensor(float(scores.numel())),
                                                 scores.double().sum().cpu(),
                                                 scores.double().square().sum().cpu()]).double())
            self.reward_moments.update_from_moments(*(float(v) for v in mom))
            scores = self.reward_moments.normalize(scores).float()
        if self.cfg.missing_eos_penalty:
            scores = scores - self.cfg.missing_eos_penalty * (~ended).float()
        return scores

    def _logprobs(self, model, seq, mask, P, eval_mode: bool = False) -> torch.Tensor:
        target = next(model.parameters()).device
        was_training = model.training
        if eval_mode:
            model.eval()
        try:
            logits = answer_logits(model, seq.to(target), mask.to(target), P)
        finally:
            if eval_mode and was_training:
                model.train()
        return gather_logprobs(logits, seq[:, P:].to(target),
                               temperature=self.cfg.temperature).float().to(self.device)

    def _score(self, seq, mask) -> torch.Tensor:
        reward = self.models.reward
        target = next(reward.parameters()).device
        values = reward(seq.to(target), mask.to(target))
        return gather_last(values, mask.to(target)).float().to(self.device)

    # ------------------------------------------------------------------ 4. PPO update
    def train_rlhf(self, exp: Experience, loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One PPO mini-batch update of actor and critic; returns (actor_loss, critic_loss).

        loss_scale: factor on both losses before backward (run_ppo's token weighting of
        length-grouped micro-batches under gradient accumulation); the returned losses are unscaled.
        """
        cfg, m = self.cfg, self.models
        if not isinstance(exp, Experience):
            exp = Experience.from_dict(exp)
        P, mask, act = exp.prompt_len, exp.attention_mask, exp.action_mask
        # actor
        logits = answer_logits(m.actor, exp.sequences, mask, P)
        logprobs = gather_logprobs(logits, exp.sequences[:, P:], temperature=cfg.temperature)
        actor_loss, pstats = policy_loss(logprobs, exp.logprobs, exp.advantages, act, cfg.cliprange)
        gap = {}
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach(), temperature=cfg.temperature), act)
            if self._pre_update:
                # No optimizer step since the rollout: any difference between the old log-probs
                # and this forward is rollout/training mismatch, not learning.
                gap = logprob_gap_stats(logprobs.detach(), exp.logprobs, act)
        boundary = m.actor.is_gradient_accumulation_boundary()
        m.actor.backward(actor_loss * loss_scale if loss_scale != 1.0 else actor_loss)
        m.actor.step()
        if boundary:
            self._pre_update = False
        # critic
        values = answer_values(m.critic, exp.sequences, mask, P)
        critic_loss, vstats = value_loss(values, exp.values, exp.returns, act, cfg.cliprange_value)
        m.critic.backward(critic_loss * loss_scale if loss_scale != 1.0 else critic_loss)
        m.critic.step()
        self.last_stats.update({
            "loss/actor": actor_loss.item(), "loss/critic": critic_loss.item(),
            "policy/clipfrac": float(pstats["clipfrac"]), "policy/approx_kl": float(pstats["approx_kl"]),
            "policy/ratio": float(pstats["ratio_mean"]), "policy/entropy": entropy.item(),
            "value/clipfrac": float(vstats["vf_clipfrac"]), **gap,
        })
        for k in [k for k in self.last_stats if k.startswith("policy/logprob_gap") and k not in gap]:
            del self.last_stats[k]
        return actor_loss.detach(), critic_loss.detach()

    def train_unsupervised(self, batch: dict, unsup_coef: float) -> torch.Tensor:
        """PTX: unsup_coef x next-token loss on plain text, through the actor."""
        m, dev = self.models, self.device
        out = m.actor(**model_inputs(m.actor, batch["input_ids"].to(dev), batch["attention_mask"].to(dev)),
                      use_cache=False)
        loss = sft_loss(out.logits, batch["labels"].to(dev))
        m.actor.backward(unsup_coef * loss)
        m.actor.step()
        return loss.detach()


def minibatch_rows(exp: Experience, micro_batch: int, accumulation: int) -> list[list[torch.Tensor]]:
    """Row indices of one PPO epoch over `exp`: per optimizer step, its micro-batches.

    Rows are shuffled into optimizer steps of micro_batch x accumulation rows. Within one step
    the rows are ordered by length before being cut into micro-batches, so each micro-batch
    (trimmed by Experience.select) carries little padding; with `token_scales` the step's
    gradient is the same as one batch of all its rows would give.
    """
    perm = torch.randperm(exp.batch_size)
    lengths = exp.attention_mask.sum(1)
    steps = []
    per_step = micro_batch * accumulation
    for s in range(0, exp.batch_size, per_step):
        rows = perm[s:s + per_step]
        if accumulation > 1:
            rows = rows[torch.argsort(lengths[rows], stable=True)]
        steps.append([rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)])
    return steps


def token_scales(exp: Experience, step_rows: list[torch.Tensor]) -> list[float]:
    """Loss factor per micro-batch so that gradient accumulation (which averages the micro-batch
    losses) gives the token mean over the whole step: n_tokens(micro) x n_micro / n_tokens(step)."""
    counts = [float(exp.action_mask[rows].sum()) for rows in step_rows]
    total = sum(counts)
    return [c * len(counts) / total if total > 0 else 1.0 for c in counts]


def ended_with_eos(answer, action_mask, eos_id) -> torch.Tensor:
    """[B] bool: the answer ended with an EOS (the others hit max_answer_seq_len)."""
    last = (action_mask.sum(1) - 1).clamp(min=0).long()
    return answer.gather(1, last.unsqueeze(1)).squeeze(1) == eos_id


def logprob_gap_stats(logprobs: torch.Tensor, old_logprobs: torch.Tensor, action_mask) -> dict:
    """Rollout/training mismatch at equal weights: mean and max |log p - log p_old| over answer
    tokens, and the token probability ratio exp(log p - log p_old) (mean and max)."""
    d = (logprobs.float() - old_logprobs.float()) * action_mask
    n = action_mask.sum().clamp(min=1)
    ratio = torch.exp(d.clamp(-20, 20))
    on = action_mask.bool()
    return {"policy/logprob_gap": (d.abs().sum() / n).item(),
            "policy/logprob_gap_max": d.abs().max().item(),
            "policy/logprob_gap_ratio": ((ratio * action_mask).sum() / n).item(),
            "policy/logprob_gap_ratio_max": ratio[on].max().item() if on.any() else 1.0}


def whiten_experiences(exps: list[Experience], shift_mean: bool = True) -> None:
    """Whiten the advantages of all `exps` with one mean and variance, taken over every answer
    token of every experience on every rank (count, sum and sum of squares all-reduced).

    Whitening each rollout batch (or each rank) on its own would make every batch's advantages
    sum to zero: with a generation batch of 1 each answer would lose the signal that it was,
    as a whole, better or worse than the others."""
    moments = sum(masked_moments(e.advantages, e.action_mask) for e in exps)
    moments = ds.all_reduce_sum(moments)
    for e in exps:
        e.advantages = whiten_from_moments(e.advantages, e.action_mask, moments, shift_mean)


# ---------------------------------------------------------------------------- the step

def build_models(cfg, tokenizer, total_steps: int, dtype: str,
                 actor_total_steps: int | None = None) -> RLHFModels:
    actor_path = resolve_model_path(cfg.actor_model_name_or_path)
    critic_path = resolve_model_path(cfg.critic_model_name_or_path)
    reward_path = resolve_model_path(cfg.reward_model_name_or_path) if cfg.reward_model_name_or_path \
        else critic_path
    common.require_value_heads({"critic": critic_path, "reward model": reward_path},
                               cfg.allow_untrained_reward_head)
    return RLHFModels(
        ModelSpec(actor_path, cfg.actor_zero_stage, cfg.actor_dropout, cfg.actor_lora_dim,
                  cfg.actor_lora_module_name, cfg.only_optimize_lora, cfg.actor_learning_rate,
                  cfg.actor_lora_learning_rate, cfg.actor_weight_decay, cfg.actor_gradient_checkpointing),
        ModelSpec(critic_path, cfg.critic_zero_stage, cfg.critic_dropout, cfg.critic_lora_dim,
                  cfg.critic_lora_module_name, cfg.only_optimize_lora, cfg.critic_learning_rate,
                  cfg.critic_lora_learning_rate, cfg.critic_weight_decay, cfg.critic_gradient_checkpointing),
        reward_path, tokenizer, dtype=dtype, offload=cfg.offload,
        micro_batch=cfg.per_device_training_batch_size, grad_accum=cfg.gradient_accumulation_steps,
        grad_clip=cfg.max_grad_norm, scheduler=cfg.lr_scheduler_type,
        warmup_steps=cfg.num_warmup_steps, total_steps=total_steps,
        offload_reference_model=cfg.offload_reference_model,
        offload_reward_model=cfg.offload_reward_model, enable_ema=cfg.enable_ema,
        release_inference_cache=cfg.release_inference_cache, actor_total_steps=actor_total_steps,
        deepspeed_config=cfg.deepspeed_config)


def iterations_per_epoch(n_prompts: int, cfg, world: int) -> int:
    per_iter = cfg.per_device_generation_batch_size * cfg.generation_batches * world
    return n_prompts // per_iter


def run_ppo(cfg) -> Path:
    # 0. set-up
    run = common.start_run(cfg, "ppo")
    if run.finished:  # --resume of a finished step
        return run.finished
    actor_path = resolve_model_path(cfg.actor_model_name_or_path)
    tokenizer = common.load_tokenizer_for(cfg, actor_path)
    tokenizer.padding_side = "left"
    template = common.template_for(cfg, tokenizer)
    from ..models import read_meta

    template = read_meta(actor_path).get("template", template) if cfg.template == "auto" else template

    # 1. prompts of this step's slice (too-long prompts dropped and counted)
    train_ds, eval_ds, stats = common.step_datasets(cfg, tokenizer, template, "prompt", 3,
                                                    cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                                                    cfg.max_prompt_seq_len)
    dropped = stats["train"].get("dropped_long_prompts", 0)
    write_line(f"ppo: {len(train_ds)} prompts ({dropped} longer than {cfg.max_prompt_seq_len} "
               f"tokens dropped), {template} format")
    world, rank = run.world, ds.rank()
    per_epoch = iterations_per_epoch(len(train_ds), cfg, world)
    if per_epoch == 0:
        from ..errors import DataError

        raise DataError(f"ppo has {len(train_ds)} prompts, fewer than one iteration needs "
                        f"({cfg.per_device_generation_batch_size} x {cfg.generation_batches} x {world} "
                        "devices); lower --per-device-generation-batch-size or add data")
    n_iters = per_epoch * cfg.num_train_epochs
    if cfg.max_steps > 0:
        n_iters = min(n_iters, cfg.max_steps)
    if cfg.enable_test_mode and cfg.test_stop_step > 0:
        n_iters = min(n_iters, cfg.test_stop_step)
    mb_per_iter = cfg.per_device_generation_batch_size * cfg.generation_batches // cfg.per_device_training_batch_size
    opt_steps = n_iters * cfg.ppo_epochs * mb_per_iter // cfg.gradient_accumulation_steps
    # PTX takes its own actor optimizer step after each PPO step: the actor's schedule counts both
    actor_steps = opt_steps * (2 if cfg.unsupervised_dataset_name else 1)

    # 2. models
    models = build_models(cfg, tokenizer, opt_steps, run.dtype, actor_total_steps=actor_steps)
    trainer = PPOTrainer(models, cfg)
    ptx, ptx_used = None, 0
    flops_actor = matmul_params(models.actor.module)
    flops_critic = matmul_params(models.critic.module)

    # resume
    it, epoch, start_batch = 0, 0, 0
    engines = {"actor": models.actor, "critic": models.critic}
    if cfg.resume and (found := common.resume_checkpoint(run, engines)) is not None:
        last, state = found
        it, epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        run.logger.truncate_after(it)
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
        if trainer.reward_moments is not None and "reward_moments" in state:
            trainer.reward_moments.load_state_dict(state["reward_moments"])
        if models.actor_ema is not None:
            if not (last / "actor_ema.pt").exists():
                from ..errors import ConfigError

                raise ConfigError(f"{last} holds no actor_ema.pt (it was written without "
                                  "--enable-ema); resume without --enable-ema or start afresh")
            models.actor_ema = torch.load(last / "actor_ema.pt")
        ptx_used = state.get("ptx_batches", 0)
        write_line(f"resumed from {last} at iteration {it}")
    if cfg.unsupervised_dataset_name:
        ptx = load_ptx(cfg, tokenizer, skip=ptx_used)

    bar = progress(n_iters, "ppo", cfg.progress, initial=it, unit="iter")
    gap_warned = False
    gb = cfg.per_device_generation_batch_size
    while it < n_iters:
        order = common.epoch_batches(len(train_ds), cfg.seed, epoch, gb * world)
        groups = [order[i:i + cfg.generation_batches]
                  for i in range(0, per_epoch * cfg.generation_batches, cfg.generation_batches)]
        for g in range(start_batch, len(groups)):
            if it >= n_iters:
                break
            t_iter = time.time()
            # 1-3. experience from `generation_batches` rollout batches
            exps, gen_stats = [], []
            for global_rows in groups[g]:
                rows = global_rows[rank * gb:(rank + 1) * gb]
                batch = collate_prompts([train_ds[i] for i in rows], tokenizer.pad_token_id)
                exps.append(trainer.make_experience(batch["input_ids"], batch["attention_mask"]))
                gen_stats.append(dict(trainer.last_stats))
            if cfg.whiten_advantages:  # over the whole update, all ranks
                whiten_experiences(exps)
            # 4. PPO epochs over mini-batches (each within one rollout batch: no re-padding)
            t_train = time.time()
            train_stats = []
            for _ in range(cfg.ppo_epochs):
                for exp in exps:
                    for step_rows in minibatch_rows(exp, cfg.per_device_training_batch_size,
                                                    cfg.gradient_accumulation_steps):
                        for rows, scale in zip(step_rows, token_scales(exp, step_rows)):
                            trainer.train_rlhf(exp.select(rows), loss_scale=scale)
                            train_stats.append(dict(trainer.last_stats))
                        # PTX: its own optimizer step after each PPO step (as DeepSpeed-Chat),
                        # of as many micro-batches, so accumulation never mixes the two.
                        for k in range(len(step_rows) if ptx is not None else 0):
                            ptx_loss = trainer.train_unsupervised(next(ptx), cfg.unsup_coef)
                            ptx_used += 1
                            train_stats[k - len(step_rows)]["loss/ptx"] = ptx_loss.item()
            t_train = time.time() - t_train
            # 5. EMA, KL controller, metrics, answers, checkpoint
            models.update_ema(cfg.ema_beta)
            n_samples = sum(e.batch_size for e in exps)
            it += 1
            # per-rank means, then the mean over ranks (max for *_max): every rank logs and
            # feeds the KL controller the same global values
            metrics = _mean_stats(gen_stats, ("reward/", "policy/kl", "response/", "tokens/",
                                              "rollout/"))
            metrics.update(_mean_stats(train_stats, ("loss/", "policy/clipfrac", "policy/approx_kl",
                                                     "policy/ratio", "policy/entropy", "value/",
                                                     "policy/logprob_gap")))
            metrics = reduce_across_ranks(metrics)
            trainer.kl_ctl.update(metrics["policy/kl"], n_samples * world)
            t_gen = sum(s["time/generate"] for s in gen_stats)
            t_score = sum(s["time/score"] for s in gen_stats)
            dt = time.time() - t_iter
            tokens = sum(int(e.attention_mask.sum()) for e in exps)
            gen_tokens = sum(s["tokens/generated"] for s in gen_stats)
            # generation + reference forward (actor-sized), critic + reward forwards, PPO epochs
            flops = (2 * forward_flops(flops_actor, tokens) + 2 * forward_flops(flops_critic, tokens)
                     + cfg.ppo_epochs * train_flops(flops_actor + flops_critic, tokens))
            metrics.update({"time/generate": t_gen, "time/score": t_score, "time/train": t_train,
                            "time/iteration": dt, "perf/samples_per_s": n_samples * world / dt,
                            "perf/tokens_per_s": tokens * world / dt,
                            "perf/generated_tokens_per_s": gen_tokens * world / max(t_gen, 1e-9),
                            "perf/flops_per_s": flops * world / dt, "policy/kl_coef": trainer.kl_ctl.value,
                            "lr/actor": models.actor.get_lr()[0], "lr/critic": models.critic.get_lr()[0]})
            gap = metrics.get("policy/logprob_gap", 0.0)
            if cfg.logprob_gap_warn and gap > cfg.logprob_gap_warn and not gap_warned:
                gap_warned = True
                write_line(f"warning: iteration {it}: the old log-probs differ from the training "
                           f"forward by {gap:.3g} on average (max {metrics['policy/logprob_gap_max']:.3g}) "
                           "before any update; the PPO ratio is off by that much. "
                           + ("Use --recompute-old-logprobs" if not trainer.recompute_old_logprobs
                              else "Check --dtype and dropout (--actor-dropout 0)"))
            common.guard_metrics(run, f"iteration {it}", metrics)
            run.logger.log(it, metrics)
            bar.set_postfix(reward=f"{metrics['reward/score']:.3f}", kl=f"{metrics['policy/kl']:.3f}")
            bar.update(1)
            if cfg.print_answers and it % cfg.print_answers_interval == 0:
                print_answers(exps[0], tokenizer, it)
            if cfg.log_rollouts_interval and it % cfg.log_rollouts_interval == 0 and ds.is_main():
                from ..rollouts import log_rollouts

                log_rollouts(run.out_dir, it, exps, tokenizer)  # for `chatrl inspect`
            if cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0 and it < n_iters:
                common.checkpoint_guard(run, f"iteration {it}", engines, lambda: probe_outputs(trainer, exps[-1]))
                nxt = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)
                ckpt.save_checkpoint(run.ckpt_dir, it, engines,
                                     {"epoch": nxt[0], "batch_in_epoch": nxt[1],
                                      "kl_ctl": trainer.kl_ctl.state_dict(), "ptx_batches": ptx_used,
                                      **({"reward_moments": trainer.reward_moments.state_dict()}
                                         if trainer.reward_moments is not None else {})},
                                     extra_objects=({"actor_ema.pt": models.actor_ema}
                                                    if models.actor_ema is not None else None))
        epoch += 1
        start_batch = 0
    bar.close()

    # 6. save actor, critic (and EMA) as loadable folders
    common.guard_weights(run, f"iteration {it}", engines, lambda: probe_outputs(trainer, exps[-1]))
    meta = {"template": template, "base_model": actor_path}
    ckpt.save_model(models.critic.module, tokenizer, run.out_dir / "critic", {"step": "ppo-critic", **meta})
    if models.actor_ema is not None:
        save_ema(models, tokenizer, run.out_dir / "actor_ema", {"step": "ppo-ema", **meta})
    # The actor last: actor/chatrl.json marks step 3 finished (chatrl train, --resume).
    ckpt.save_model(models.actor.module, tokenizer, run.out_dir / "actor", {"step": "ppo", **meta})
    write_line(f"ppo: done; actor saved to {run.out_dir / 'actor'}")
    common.finish_run(run)
    return run.out_dir / "actor"


def save_ema(models: RLHFModels, tokenizer, out_dir: Path, meta: dict) -> None:
    from ..models.load import atomic_dir, write_meta
    from ..models.lora import has_lora, merged_state_dict

    if not ds.is_main():
        return
    state = models.actor_ema
    module = models.actor.module
    if has_lora(module):
        state = merged_state_dict(module, state)
    with atomic_dir(out_dir) as tmp:
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, kind="causal_lm", **meta)


def probe_outputs(trainer: PPOTrainer, exp: Experience) -> dict:
    """Actor logits and critic values on two rows of the last experience at the current weights
    (eval mode, no RNG): what common.guard_weights checks after an update, before a save."""
    m, rows = trainer.models, exp.select(torch.arange(min(2, exp.batch_size)))
    m.actor.eval(), m.critic.eval()
    try:
        return {"actor outputs": answer_logits(m.actor, rows.sequences, rows.attention_mask, rows.prompt_len),
                "critic values": answer_values(m.critic, rows.sequences, rows.attention_mask, rows.prompt_len)}
    finally:
        m.actor.train(), m.critic.train()


def _mean_stats(rows: list[dict], prefixes: tuple) -> dict:
    """Mean of each metric over the rows that have it (the max for `*_max` metrics)."""
    keys = {k for r in rows for k in r if k.startswith(prefixes)}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if k in r]
        out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out


def reduce_across_ranks(metrics: dict) -> dict:
    """Per-rank metric values -> the mean over ranks (the max for `*_max`). Collective: every rank
    has the same keys (they follow from the config)."""
    if ds.world_size() == 1:
        return metrics
    keys = sorted(metrics)
    means = [k for k in keys if not k.endswith("_max")]
    maxes = [k for k in keys if k.endswith("_max")]
    total = ds.all_reduce_sum(torch.tensor([float(metrics[k]) for k in means], dtype=torch.float64))
    out = {k: v / ds.world_size() for k, v in zip(means, total.tolist())}
    if maxes:
        import torch.distributed as dist

        t = torch.tensor([float(metrics[k]) for k in maxes], dtype=torch.float64)
        t = t.to(ds.device()) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.update(zip(maxes, t.cpu().tolist()))
    return out


def print_answers(exp: Experience, tokenizer, it: int) -> None:
    if not ds.is_main():
        return
    P = exp.prompt_len
    for i in range(min(2, exp.batch_size)):
        prompt = tokenizer.decode(exp.sequences[i, :P][exp.attention_mask[i, :P].bool()], skip_special_tokens=True)
        n = int(exp.action_mask[i].sum())
        answer = tokenizer.decode(exp.sequences[i, P:P + n], skip_special_tokens=True)
        write_line(f"[ppo {it}] score={exp.scores[i]:.3f}\n  prompt: {prompt.strip()[-200:]}\n  answer: {answer.strip()}")


def load_ptx(cfg, tokenizer, skip: int = 0):
    """An endless iterator of LM batches from the unsupervised (PTX) dataset, `skip` batches in."""
    from ..data.ptx import ptx_batches

    return ptx_batches(cfg.unsupervised_dataset_name, cfg.unsupervised_dataset_config_name, tokenizer,
                       max_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                       batch_size=cfg.per_device_training_batch_size, seed=cfg.seed, skip=skip)
