"""Step 3 — online RL: PPO and the critic-free family (GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++), one loop over the stages of stages.py:

  1. rollout:    sample G answers per prompt from the actor in generation mode (temperature /
                 top-p, not greedy); old log-probs from the generation logits or a forward;
  2. score:      the reward sources (reward model, functions, verifiers, a server), weighted;
                 then one forward each of the reference and the critic where the algorithm has them;
  3. advantages: GAE with the critic (PPO), the group baseline (GRPO, RLOO), or discounted
                 returns whitened over the batch (REINFORCE++); KL in the reward or in the loss;
  4. update:     epochs over mini-batches: the clipped policy objective (token or sequence ratio,
                 asymmetric clip, token-mean / sequence-mean / constant aggregation), the clipped
                 value loss (PPO); optional PTX;
  5. EMA, KL controller, metrics, evaluation on held-out prompts, sample answers, checkpoint.

`chatrl ppo` (PPOConfig) is the PPO preset; `chatrl grpo` / `chatrl rl --algo NAME` (RLConfig)
the others. Every choice is an option (PPOConfig.algorithm() resolves them into AlgoSettings).

Shapes: prompts are left-padded to the batch's longest prompt P; answers are right-padded to the
batch's longest answer R (never to a fixed length). `action_mask` [B, R] marks answer tokens up to
and including the first EOS.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..engine import checkpoint as ckpt
from ..engine import ds
from ..engine.flops import forward_flops, matmul_params, train_flops_per_token
from ..engine.hybrid import GenerationParams
from ..engine.rlhf import ModelSpec, RLHFModels
from ..logging import progress, write_line
from ..models import resolve_model_path
from ..models.load import model_inputs
from ..rl import (AdaptiveKLController, FixedKLController, RunningMoments, informative_groups,
                  kl_penalty, masked_moments, overlong_penalty, sft_loss, whiten_from_moments)
from . import common
from . import stages
from .online import (PromptStream, collect_experience, load_prompts,  # noqa: F401  (re-exported)
                     reward_model_path, reward_sources)
from .stages import (Experience, answer_logits, answer_values, ended_with_eos,  # noqa: F401
                     logprob_gap_stats)  # (re-exported: the API, tests and benchmarks import them here)

# warn (once) when at least this share of a rollout's reward-model scores lie beyond
# --clip-reward-value: DeepSpeed-Chat's clip of 5 assumes scores near 0, but a reward model
# trained on pairs alone has no anchored mean (the default run's averaged 2 to 8, by seed)
CLIPPED_WARN = 0.5


def _rollout_states(hidden: torch.Tensor | None, seq: torch.Tensor) -> torch.Tensor | None:
    """The frozen trunk's output recorded during a rollout ([N, positions forwarded, H]: the
    prompt, then one per decode step) cut or completed to seq's [N, P + R] positions. The last
    answer token is never forwarded by the rollout; the states there are zeros, read by no
    pass: it predicts nothing, and no earlier position attends to it."""
    T = seq.shape[1]
    if hidden is None or hidden.shape[0] != seq.shape[0] or hidden.shape[1] < T - 1:
        return None
    if hidden.shape[1] >= T:
        return hidden[:, :T].contiguous()
    return torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])], dim=1)


class PPOTrainer:
    """generate_experience(prompts) and train_rlhf(experience) over an RLHFModels bundle, for
    every online algorithm (the name is DeepSpeed-Chat's).

    `cfg` is a PPOConfig (or RLConfig); every hyper-parameter is read from it here and nowhere
    else, the algorithm's choices through cfg.algorithm(). `sources` / `weights`: the reward
    sources (chatrl.rewards); default: the reward model alone, as PPO.
    """

    def __init__(self, models: RLHFModels, cfg, sources: list | None = None,
                 weights: list[float] | None = None):
        self.models = models
        self.cfg = cfg
        self.algo = cfg.algorithm()
        self.tokenizer = models.tokenizer
        self.kl_ctl = (AdaptiveKLController(self.algo.kl_coef, cfg.kl_target, cfg.kl_horizon)
                       if cfg.adaptive_kl else FixedKLController(self.algo.kl_coef))
        self.gen_params = GenerationParams(
            max_new_tokens=cfg.max_answer_seq_len, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id)
        if sources is None:
            from ..rewards.model import RewardModelSource

            sources, weights = [RewardModelSource(models.reward, "model")], [1.0]
        self.sources, self.weights = sources, list(weights or [1.0] * len(sources))
        self.last_stats: dict = {}
        self.device = ds.device()
        # Old log-probs: from the generation logits (no extra forward) when the actor trains in
        # fp32, where both agree to ~1e-6; from a forward of the training module otherwise
        # (bf16/fp16 generation with a KV cache rounds differently from a full forward).
        rec = cfg.recompute_old_logprobs
        # Also recomputed by default from llama.cpp's 8-bit rollouts (a mean gap of ~0.08 nats).
        rollout_weights = getattr(models.hybrid, "rollout_weights", "same")
        self.recompute_old_logprobs = ((models.dtype != "fp32" or rollout_weights == "q8_0")
                                       if rec is None else bool(rec))
        self.reward_moments = RunningMoments() if cfg.normalize_reward else None
        self._pre_update = False  # no optimizer step since the last rollout (see train_rlhf)
        # The frozen lower blocks' output, recorded while scoring and replayed by each epoch's
        # training forwards (chatrl.engine.trunk; only with --*-num-layers-unfrozen).
        from ..engine.trunk import rollout_records_trunk, trunk_shares

        self.trunk = (trunk_shares(models, self.algo.num_generations)
                      if getattr(cfg, "share_frozen_trunk", True) else {})
        # Where the actor's rollout computes that output itself, for every position it forwards,
        # it is recorded there, and the reference forward starts at the first trained block too.
        share = self.trunk.get("actor")
        self.trunk_from_rollout = (share is not None and share.twin is not None and rollout_records_trunk(
            models.dtype, rollout_weights, getattr(models.hybrid, "backend_name", "hf")))

    # ------------------------------------------------------------------ 1-3. experience
    @torch.no_grad()
    def generate_experience(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            step: int | None = None, rows: list | None = None) -> Experience:
        """One rollout batch, scored, with advantages whitened over it (on all ranks together)
        when the algorithm whitens.

        run_ppo collects `generation_batches` of these with make_experience and whitens them
        together (whiten_experiences), so the statistics span the whole update."""
        exp = self.make_experience(input_ids, attention_mask, rows)
        if self.algo.whiten:
            whiten_experiences([exp])
        return exp

    @torch.no_grad()
    def make_experience(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        rows: list | None = None) -> Experience:
        """Stages 1-3 for one rollout batch: rollout (G answers per prompt), reward sources,
        reference log-probs and critic values where the algorithm has them, shaped scores,
        per-token rewards and advantages (not yet whitened). `rows`: the prompts' data rows
        (their columns reach reward functions)."""
        cfg, m, algo = self.cfg, self.models, self.algo
        # 1. rollout (generation mode: gathered / merged weights, KV cache, no dropout)
        from_rollout = self.trunk_from_rollout and algo.num_generations == 1
        with self.trunk["actor"].capture_rollout(m.hybrid, m.actor.module) if from_rollout else nullcontext():
            ro = stages.rollout(m.hybrid, input_ids, attention_mask, self.gen_params,
                                n_samples=algo.num_generations, rows=rows, device=self.device)
        seq, mask, act, P = ro.sequences, ro.attention_mask, ro.action_mask, ro.prompt_len
        # 2. scores of every reward source, then the reference and critic forwards
        t1 = time.time()
        trunk: dict = {}  # the frozen trunks' output over seq (see __init__), for later passes
        if from_rollout and (states := _rollout_states(self.trunk["actor"].taken(), seq)) is not None:
            trunk["actor"] = states
        with self._record(trunk, "critic", m.reward, ro.group_size):
            sc = stages.score(ro, self.tokenizer, self.sources, self.weights, skip_bad=cfg.skip_bad_rewards)
        t_reward = time.time() - t1
        ref_logprobs = None
        if m.ref is not None:
            with self._record(trunk, "actor", m.ref, ro.group_size), \
                    stages.replay(self.trunk.get("actor"), m.ref, trunk):
                ref_logprobs = stages.forward_logprobs(m.ref, seq, mask, P, cfg.temperature, self.device,
                                                       group_size=ro.group_size) * act
        if self.recompute_old_logprobs:  # after the reference forward: its frozen trunk replays here
            with stages.replay(self.trunk.get("actor"), m.actor, trunk):
                stages.recompute_logprobs(ro, m.actor, cfg.temperature)
        logprobs = ro.logprobs
        values = None
        if m.critic is not None:
            m.critic.eval()  # old values without dropout
            with self._record(trunk, "critic", m.critic, ro.group_size), \
                    stages.replay(self.trunk.get("critic"), m.critic, trunk):
                values = answer_values(m.critic, seq, mask, P) * act
            m.critic.train()
        lengths = act.sum(1)
        scores = self._shape_scores(sc.total, ro.ended, lengths)
        # 3. per-token rewards (KL in the reward where the algorithm puts it there), advantages
        rewards, advantages, returns = stages.compute_advantages(
            algo, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
            action_mask=act, group_size=ro.group_size, kl_coef=self.kl_ctl.value,
            clip_reward=cfg.clip_reward_value, gamma=cfg.gamma, lam=cfg.lam)
        t_score = time.time() - t1
        n_tokens = act.sum()
        self._pre_update = True
        self.last_stats = {
            "reward/score": sc.total.mean().item(),
            "reward/shaped_score": scores.mean().item(),
            "reward/total": (rewards.sum(1)).mean().item(),
            "policy/kl_coef": self.kl_ctl.value,
            "response/length": lengths.float().mean().item(),
            "response/eos_rate": ro.ended.float().mean().item(),
            "response/truncated": 1.0 - ro.ended.float().mean().item(),
            "time/generate": ro.stats["time/generate"], "time/score": t_score, "time/reward": t_reward,
            "tokens/generated": n_tokens.item(), "tokens/prompt": attention_mask.sum().item() * ro.group_size,
            **{k: v for k, v in ro.stats.items() if k.startswith("rollout/")},
        }
        if algo.estimator == "gae" and cfg.clip_reward_value is not None:
            # scores beyond the clip all count alike: a rollout mostly out there teaches little
            self.last_stats["reward/clipped"] = (scores.abs() > cfg.clip_reward_value).float().mean().item()
        if ref_logprobs is not None:
            kl_tok = kl_penalty(logprobs, ref_logprobs, algo.kl_estimator) * act
            self.last_stats["policy/kl"] = kl_tok.sum(1).mean().item()
        for name, t in sc.per_source.items():  # every source on its own
            self.last_stats[f"reward/{name}/mean"] = t.mean().item()
            self.last_stats[f"reward/{name}/std"] = t.std(unbiased=False).item()
            if cfg.skip_bad_rewards:
                self.last_stats[f"reward/{name}/bad"] = float(sc.bad[name])
        if sc.accuracy is not None:
            self.last_stats["reward/accuracy"] = sc.accuracy.mean().item()
        if ro.group_size > 1:
            keep = informative_groups(scores.cpu(), ro.group_size)
            self.last_stats["sampling/zero_variance_groups"] = 1.0 - keep.float().mean().item()
        return Experience(seq, mask, act, P, logprobs, ref_logprobs, values, scores, rewards,
                          advantages, returns, ro.group_size, ro.rows or None,
                          sc.accuracy.to(self.device) if sc.accuracy is not None else None,
                          [{name: round(float(t[i]), 5) for name, t in sc.per_source.items()}
                           for i in range(len(scores))], ro.entropy, trunk or None)

    @property
    def score_skips_reference_trunk(self) -> bool:
        """Whether the reference forward skips the frozen blocks (their output recorded in the
        rollout): for the FLOP count."""
        return self.trunk_from_rollout and self.algo.num_generations == 1 and self.models.ref is not None

    @contextmanager
    def _record(self, into: dict, role: str, model, group_size: int):
        """Record `role`'s frozen-trunk output into `into` during this forward of `model`, where
        `model` is the one the share records from and nothing is recorded yet."""
        share = self.trunk.get(role) if group_size == 1 else None
        trained = {"actor": self.models.actor, "critic": self.models.critic}[role]
        if share is None or role in into or model is not (share.twin if share.twin is not None else trained):
            yield
            return
        with share.capture(model):
            yield
        hidden = share.taken()
        if hidden is not None:
            into[role] = hidden

    def _shape_scores(self, scores: torch.Tensor, ended: torch.Tensor,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Reward scores -> the scores the algorithm optimises: optionally normalised by their
        running mean and std (statistics all-reduced, so every rank normalises alike), minus
        --missing-eos-penalty for answers cut at the length limit, plus DAPO's over-long penalty."""
        if self.reward_moments is not None:
            mom = ds.all_reduce_sum(torch.stack([torch.tensor(float(scores.numel())),
                                                 scores.double().sum().cpu(),
                                                 scores.double().square().sum().cpu()]).double())
            self.reward_moments.update_from_moments(*(float(v) for v in mom))
            scores = self.reward_moments.normalize(scores).float()
        if self.cfg.missing_eos_penalty:
            scores = scores - self.cfg.missing_eos_penalty * (~ended).float()
        if self.algo.overlong_buffer and lengths is not None:
            scores = scores + overlong_penalty(lengths, self.cfg.max_answer_seq_len,
                                               self.algo.overlong_buffer,
                                               self.cfg.overlong_penalty).to(scores.device)
        return scores

    # ------------------------------------------------------------------ 4. update
    def train_rlhf(self, exp: Experience, loss_scale: float = 1.0,
                   critic_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One mini-batch update of the actor (and the critic, if any); returns (actor_loss,
        critic_loss), the latter 0 without a critic.

        loss_scale / critic_scale: factors on the losses before backward (run_ppo's global
        normalisation of micro-batches under gradient accumulation and several ranks, see
        token_scales); the returned losses are unscaled. critic_scale defaults to loss_scale.
        """
        cfg, m = self.cfg, self.models
        if not isinstance(exp, Experience):
            exp = Experience.from_dict(exp)
        boundary = m.actor.is_gradient_accumulation_boundary()
        # No optimizer step since the rollout: any difference between the old log-probs and this
        # forward is rollout/training mismatch, not learning (logged as policy/logprob_gap).
        actor_loss, pstats = stages.update_policy(
            m.actor, exp, self.algo, temperature=cfg.temperature, max_len=cfg.max_answer_seq_len,
            scale=loss_scale, measure_gap=self._pre_update, trunk=self.trunk.get("actor"))
        if boundary:
            self._pre_update = False
        critic_loss, vstats = torch.zeros(()), {}
        if m.critic is not None:
            critic_loss, vstats = stages.update_critic(
                m.critic, exp, cfg.cliprange_value, loss_scale if critic_scale is None else critic_scale,
                trunk=self.trunk.get("critic"))
        self.last_stats.update(pstats)
        self.last_stats.update(vstats)
        for k in [k for k in self.last_stats if k.startswith("policy/logprob_gap") and k not in pstats]:
            del self.last_stats[k]
        return actor_loss, critic_loss

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


def token_scales(exp: Experience, step_rows: list[torch.Tensor], unit: str = "token",
                 total: float | None = None, world: int = 1) -> list[float]:
    """Loss factor per micro-batch so that gradient accumulation (which averages the micro-batch
    losses) and the mean over `world` ranks give the loss of the whole global step.

    Each micro-batch's loss is a mean over its own units (answer tokens for token_mean, answers
    for the sequence aggregations): factor = units(micro) x n_micro x world / units(global step),
    with `total` the global count (this rank's step when None)."""
    counts = [float(exp.action_mask[rows].sum()) if unit == "token" else float(len(rows))
              for rows in step_rows]
    total = sum(counts) if total is None else total
    return [c * len(counts) * world / total if total > 0 else 1.0 for c in counts]


def global_units(exp: Experience, step_rows: list[torch.Tensor], unit: str) -> float:
    """The units (answer tokens, or answers) of one optimizer step over all ranks (collective)."""
    mine = sum(float(exp.action_mask[r].sum()) if unit == "token" else float(len(r)) for r in step_rows)
    return ds.all_reduce_sum(torch.tensor([mine], dtype=torch.float64)).item()


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
    algo = cfg.algorithm()
    actor_path = resolve_model_path(cfg.actor_model_name_or_path)
    critic_path = resolve_model_path(cfg.critic_model_name_or_path) if algo.uses_critic else None
    reward_path = reward_model_path(cfg)
    common.require_value_heads({k: v for k, v in (("critic", critic_path), ("reward model", reward_path))
                                if v is not None}, cfg.allow_untrained_reward_head)
    # The reference model is loaded only when some KL term can use it.
    reference = algo.kl_placement != "none" and (algo.kl_coef > 0 or cfg.adaptive_kl)
    return RLHFModels(
        ModelSpec(actor_path, cfg.actor_zero_stage, cfg.actor_dropout, cfg.actor_lora_dim,
                  cfg.actor_lora_module_name, cfg.only_optimize_lora, cfg.actor_learning_rate,
                  cfg.actor_lora_learning_rate, cfg.actor_weight_decay, cfg.actor_gradient_checkpointing,
                  cfg.actor_num_layers_unfrozen),
        ModelSpec(critic_path, cfg.critic_zero_stage, cfg.critic_dropout, cfg.critic_lora_dim,
                  cfg.critic_lora_module_name, cfg.only_optimize_lora, cfg.critic_learning_rate,
                  cfg.critic_lora_learning_rate, cfg.critic_weight_decay, cfg.critic_gradient_checkpointing,
                  cfg.critic_num_layers_unfrozen)
        if critic_path else None,
        reward_path, tokenizer, dtype=dtype, offload=cfg.offload,
        micro_batch=cfg.per_device_training_batch_size, grad_accum=cfg.gradient_accumulation_steps,
        grad_clip=cfg.max_grad_norm, scheduler=cfg.lr_scheduler_type,
        warmup_steps=cfg.num_warmup_steps, total_steps=total_steps,
        offload_reference_model=cfg.offload_reference_model,
        offload_reward_model=cfg.offload_reward_model, enable_ema=cfg.enable_ema,
        release_inference_cache=cfg.release_inference_cache, actor_total_steps=actor_total_steps,
        deepspeed_config=cfg.deepspeed_config, reference=reference,
        rollout_weights=cfg.rollout_weights, generation_backend=cfg.generation_backend)


def iterations_per_epoch(n_prompts: int, cfg, world: int) -> int:
    per_iter = cfg.per_device_generation_batch_size * cfg.generation_batches * world
    return n_prompts // per_iter


def update_epochs(trainer: PPOTrainer, exps: list[Experience], ptx=None) -> tuple[list[dict], int]:
    """Stage 4 for one update: --ppo-epochs passes over shuffled mini-batches of each experience
    (within one experience: no re-padding), each micro-batch's loss scaled so that an optimizer
    step sees the aggregate over its rows on ALL ranks (token mean over the global batch, or the
    sequence means); PTX steps after each step. Returns (per-micro-batch stats, PTX batches used);
    "loss/actor_global" is each optimizer step's loss over the global batch, the same on every
    rank (loss/actor is the micro-batch's own)."""
    cfg, world = trainer.cfg, ds.world_size()
    unit = "token" if trainer.algo.aggregation == "token_mean" else "seq"
    if len(exps) > 1 and any(e.batch_size % (cfg.per_device_training_batch_size *
                                             cfg.gradient_accumulation_steps) for e in exps):
        # an optimizer step spans rollout batches (--generation-batches k with a generation
        # batch smaller than micro-batch x accumulation): mini-batches from the whole update
        exps = [Experience.concat(exps, trainer.tokenizer.pad_token_id)]
    has_critic = trainer.models.critic is not None
    stats, n_ptx = [], 0
    for _ in range(cfg.ppo_epochs):
        for exp in exps:
            for step_rows in minibatch_rows(exp, cfg.per_device_training_batch_size,
                                            cfg.gradient_accumulation_steps):
                scales = token_scales(exp, step_rows, unit, global_units(exp, step_rows, unit), world)
                critic_scales = scales if unit == "token" or not has_critic else \
                    token_scales(exp, step_rows, "token", global_units(exp, step_rows, "token"), world)
                contribution = 0.0
                for rows, scale, cscale in zip(step_rows, scales, critic_scales):
                    actor_loss, _ = trainer.train_rlhf(exp.select(rows), loss_scale=scale,
                                                       **({"critic_scale": cscale} if cscale != scale else {}))
                    contribution += float(actor_loss) * scale / (len(step_rows) * world)
                    stats.append(dict(trainer.last_stats))
                # the optimizer step's loss over the global batch (all micro-batches, all ranks)
                step_loss = ds.all_reduce_sum(torch.tensor([contribution], dtype=torch.float64)).item()
                for row in stats[-len(step_rows):]:
                    row["loss/actor_global"] = step_loss
                # PTX: its own optimizer step after each PPO step (as DeepSpeed-Chat),
                # of as many micro-batches, so accumulation never mixes the two.
                for k in range(len(step_rows) if ptx is not None else 0):
                    ptx_loss = trainer.train_unsupervised(next(ptx), cfg.unsup_coef)
                    n_ptx += 1
                    stats[k - len(step_rows)]["loss/ptx"] = ptx_loss.item()
    return stats, n_ptx


@ds.releases_engines
def run_ppo(cfg) -> Path:
    """`chatrl ppo`, and with an RLConfig `chatrl grpo` / `chatrl rl --algo NAME`."""
    name = getattr(cfg, "algo", "ppo")
    algo = cfg.algorithm()
    t_step = time.time()  # --time-limit counts from here: loading and set-up included
    # the reward sources first: a bad --reward-fn or --reward-weights is refused before the output
    # folder is claimed or anything loads
    sources, weights = reward_sources(cfg)
    # 0. set-up
    run = common.start_run(cfg, name)
    if run.finished:  # --resume of a finished step
        return run.finished
    actor_path = resolve_model_path(cfg.actor_model_name_or_path)
    tokenizer = common.load_tokenizer_for(cfg, actor_path)
    tokenizer.padding_side = "left"
    template = common.template_for(cfg, tokenizer)
    from ..models import read_meta

    template = read_meta(actor_path).get("template", template) if cfg.template == "auto" else template

    # 1. prompts (too-long prompts dropped and counted)
    train_ds, eval_ds = load_prompts(cfg, tokenizer, template, name)
    world, rank = run.world, ds.rank()
    per_epoch = iterations_per_epoch(len(train_ds), cfg, world)
    if per_epoch == 0:
        from ..errors import DataError

        raise DataError(f"{name} has {len(train_ds)} prompts, fewer than one iteration needs "
                        f"({cfg.per_device_generation_batch_size} x {cfg.generation_batches} x {world} "
                        "devices); lower --per-device-generation-batch-size or add data")
    n_iters = per_epoch * cfg.num_train_epochs
    if cfg.max_steps > 0:
        n_iters = min(n_iters, cfg.max_steps)
    if cfg.enable_test_mode and cfg.test_stop_step > 0:
        n_iters = min(n_iters, cfg.test_stop_step)
    G = algo.num_generations
    mb_per_iter = cfg.per_device_generation_batch_size * G * cfg.generation_batches // cfg.per_device_training_batch_size
    opt_steps = n_iters * cfg.ppo_epochs * mb_per_iter // cfg.gradient_accumulation_steps
    # PTX takes its own actor optimizer step after each PPO step: the actor's schedule counts both
    actor_steps = opt_steps * (2 if cfg.unsupervised_dataset_name else 1)

    # 2. models (the reward sources are built above)
    models = build_models(cfg, tokenizer, opt_steps, run.dtype, actor_total_steps=actor_steps)
    for source in sources:
        if hasattr(source, "model") and source.model is None:
            source.model = models.reward
    trainer = PPOTrainer(models, cfg, sources, weights)
    ptx, ptx_used = None, 0
    flops_actor = matmul_params(models.actor.module)
    flops_critic = matmul_params(models.critic.module) if models.critic is not None else 0
    train_per_token = sum(train_flops_per_token(e.module) for e in (models.actor, models.critic)
                          if e is not None)
    # FLOPs run, not FLOPs of the full model: a shared trunk's blocks are skipped in each epoch's
    # training forward (and in the critic's scoring forward where the reward model records it)
    skipped = {r: 2.0 * s.skipped_params(getattr(models, r).module) for r, s in trainer.trunk.items()}
    train_per_token -= sum(skipped.values())
    score_skipped = skipped.get("critic", 0.0) if getattr(trainer.trunk.get("critic"), "twin", None) \
        is not None else 0.0
    score_skipped += skipped.get("actor", 0.0) if trainer.score_skips_reference_trunk else 0.0

    # resume
    it, epoch, start_batch = 0, 0, 0
    engines = {"actor": models.actor, **({"critic": models.critic} if models.critic is not None else {})}
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
    gb = cfg.per_device_generation_batch_size
    stream = PromptStream(len(train_ds), cfg.seed, gb * world, per_epoch * cfg.generation_batches,
                          epoch, start_batch)

    evaluate = bool(cfg.eval_prompts and len(eval_ds))
    if evaluate and it == 0:  # the starting point, for comparison
        from .rl_eval import evaluate_policy

        run.logger.log(0, evaluate_policy(trainer, eval_ds, cfg, seed=cfg.seed), kind="eval")
    bar = progress(n_iters, name, cfg.progress, initial=it, unit="iter")
    gap_warned = clip_warned = False
    t_loop, it_first = time.time(), it
    while it < n_iters:
        t_iter = time.time()
        # 1-3. rollout, score, advantages over `generation_batches` rollout batches
        exps, gen_stats, sampling = collect_experience(trainer, stream, train_ds, cfg.generation_batches,
                                                       gb, rank, cfg.max_sampling_rounds)
        if algo.whiten:  # over the whole update, all ranks
            whiten_experiences(exps)
        # 4. update: epochs over mini-batches (each within one experience: no re-padding); each
        # micro-batch's loss scaled so the optimizer step sees the global batch's aggregate
        t_train = time.time()
        train_stats, n_ptx = update_epochs(trainer, exps, ptx)
        ptx_used += n_ptx
        t_train = time.time() - t_train
        # 5. EMA, KL controller, metrics, evaluation, answers, checkpoint
        models.update_ema(cfg.ema_beta)
        n_samples = sum(e.batch_size for e in exps)
        it += 1
        # per-rank means, then the mean over ranks (max for *_max): every rank logs and
        # feeds the KL controller the same global values
        metrics = _mean_stats(gen_stats, ("reward/", "policy/kl", "response/", "tokens/",
                                          "rollout/", "sampling/"))
        metrics.update(_mean_stats(train_stats, ("loss/", "policy/clipfrac", "policy/approx_kl",
                                                 "policy/ratio", "policy/entropy", "value/",
                                                 "policy/logprob_gap", "policy/kl_loss")))
        metrics.update(sampling)
        metrics = reduce_across_ranks(metrics)
        if "policy/kl" in metrics:
            trainer.kl_ctl.update(metrics["policy/kl"], n_samples * world)
        t_gen = sum(s["time/generate"] for s in gen_stats)
        t_score = sum(s["time/score"] for s in gen_stats)
        dt = time.time() - t_iter
        tokens = sum(int(e.attention_mask.sum()) for e in exps)
        gen_tokens = sum(s["tokens/generated"] for s in gen_stats)
        # generation + reference forward (actor-sized), critic + reward forwards, the updates
        flops = ((1 + (models.ref is not None)) * forward_flops(flops_actor, tokens)
                 + 2 * forward_flops(flops_critic, tokens) - score_skipped * tokens
                 + cfg.ppo_epochs * train_per_token * tokens)
        metrics.update({"time/generate": t_gen, "time/score": t_score, "time/train": t_train,
                        "time/reward": sum(s.get("time/reward", 0.0) for s in gen_stats),
                        "time/iteration": dt, "perf/samples_per_s": n_samples * world / dt,
                        "perf/tokens_per_s": tokens * world / dt,
                        "perf/generated_tokens_per_s": gen_tokens * world / max(t_gen, 1e-9),
                        "perf/flops_per_s": flops * world / dt, "policy/kl_coef": trainer.kl_ctl.value,
                        "lr/actor": models.actor.get_lr()[0]})
        if models.critic is not None:
            metrics["lr/critic"] = models.critic.get_lr()[0]
        gap = metrics.get("policy/logprob_gap", 0.0)
        if cfg.logprob_gap_warn and gap > cfg.logprob_gap_warn and not gap_warned:
            gap_warned = True
            write_line(f"warning: iteration {it}: the old log-probs differ from the training "
                       f"forward by {gap:.3g} on average (max {metrics['policy/logprob_gap_max']:.3g}) "
                       "before any update; the PPO ratio is off by that much. "
                       + ("Use --recompute-old-logprobs" if not trainer.recompute_old_logprobs
                          else "Check --dtype and dropout (--actor-dropout 0)"))
        clipped = metrics.get("reward/clipped", 0.0)
        if clipped >= CLIPPED_WARN and not clip_warned:
            clip_warned = True
            write_line(f"warning: iteration {it}: {clipped:.0%} of the reward scores lie beyond "
                       f"--clip-reward-value {cfg.clip_reward_value:g} (mean score "
                       f"{metrics['reward/score']:.3g}) and are clipped to it, so PPO cannot tell "
                       "those answers apart. " + ("Raise --clip-reward-value" if cfg.normalize_reward else
                                                  "Pass --normalize-reward to centre and scale the "
                                                  "scores before the clip"))
        common.guard_metrics(run, f"iteration {it}", metrics)
        run.logger.log(it, metrics)
        n_iters = out_of_time(cfg, it, n_iters, t_step, (time.time() - t_loop) / (it - it_first), bar, name)
        bar.set_postfix(reward=f"{metrics['reward/score']:.3f}", kl=f"{metrics.get('policy/kl', 0.0):.3f}")
        bar.update(1)
        if evaluate and ((cfg.eval_interval and it % cfg.eval_interval == 0) or it == n_iters):
            from .rl_eval import evaluate_policy

            run.logger.log(it, evaluate_policy(trainer, eval_ds, cfg, seed=cfg.seed + it), kind="eval")
        if cfg.print_answers and it % cfg.print_answers_interval == 0:
            print_answers(exps[0], tokenizer, it)
        if cfg.log_rollouts_interval and it % cfg.log_rollouts_interval == 0 and ds.is_main():
            from ..rollouts import log_rollouts

            log_rollouts(run.out_dir, it, exps, tokenizer)  # for `chatrl inspect`
        if cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0 and it < n_iters:
            common.checkpoint_guard(run, f"iteration {it}", engines, lambda: probe_outputs(trainer, exps[-1]))
            ckpt.save_checkpoint(run.ckpt_dir, it, engines,
                                 {**stream.state(),
                                  "kl_ctl": trainer.kl_ctl.state_dict(), "ptx_batches": ptx_used,
                                  **({"reward_moments": trainer.reward_moments.state_dict()}
                                     if trainer.reward_moments is not None else {})},
                                 extra_objects=({"actor_ema.pt": models.actor_ema}
                                                if models.actor_ema is not None else None))
    bar.close()

    # 6. save actor, critic (and EMA) as loadable folders
    common.guard_weights(run, f"iteration {it}", engines, lambda: probe_outputs(trainer, exps[-1]))
    meta = {"template": template, "base_model": actor_path}
    if models.critic is not None:
        ckpt.save_model(models.critic.module, tokenizer, run.out_dir / "critic",
                        {"step": f"{name}-critic", **meta})
    if models.actor_ema is not None:
        save_ema(models, tokenizer, run.out_dir / "actor_ema", {"step": f"{name}-ema", **meta})
    # The actor last: actor/chatrl.json marks step 3 finished (chatrl train, --resume).
    ckpt.save_model(models.actor.module, tokenizer, run.out_dir / "actor", {"step": name, **meta})
    write_line(f"{name}: done; actor saved to {run.out_dir / 'actor'}")
    common.finish_run(run)
    return run.out_dir / "actor"


def out_of_time(cfg, it: int, n_iters: int, t_start: float, per_iter: float, bar, name: str) -> int:
    """The iteration count, cut to `it` when --time-limit leaves no room for another iteration
    (the same on every rank: any rank that is late stops all)."""
    if not cfg.time_limit or it >= n_iters:
        return n_iters
    late = float(time.time() - t_start + per_iter > cfg.time_limit)
    if ds.world_size() > 1:
        late = float(ds.all_reduce_sum(torch.tensor(late)).item())
    if not late:
        return n_iters
    write_line(f"{name}: stopping after iteration {it} of {n_iters}: another (~{per_iter:.0f}s) would "
               f"pass the time limit of {cfg.time_limit:.0f}s for this step")
    bar.total = it
    return it


def save_ema(models: RLHFModels, tokenizer, out_dir: Path, meta: dict) -> None:
    """The actor's EMA weights as a loadable folder, written as the final models are (atomic; a
    full disk is a one-line error). Called on every rank; each holds the whole EMA."""
    ckpt.save_model(models.actor.module, tokenizer, out_dir, meta, state=models.actor_ema)


def probe_outputs(trainer: PPOTrainer, exp: Experience) -> dict:
    """Actor logits (and critic values, when there is a critic) on two rows of the last experience
    at the current weights (eval mode, no RNG): what common.guard_weights checks after an update,
    before a save."""
    m, rows = trainer.models, exp.select(torch.arange(min(2, exp.batch_size)))
    trained = [e for e in (m.actor, m.critic) if e is not None]
    for e in trained:
        e.eval()
    try:
        out = {"actor outputs": answer_logits(m.actor, rows.sequences, rows.attention_mask, rows.prompt_len)}
        if m.critic is not None:
            out["critic values"] = answer_values(m.critic, rows.sequences, rows.attention_mask,
                                                 rows.prompt_len)
        return out
    finally:
        for e in trained:
            e.train()


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
