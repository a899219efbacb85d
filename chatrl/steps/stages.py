"""The stages of step 3, shared by every online algorithm (PPO, GRPO and its family), by the
benchmark and by the tests — never a copy of the loop:

    rollout(hybrid, prompts, params, n_samples)   -> Rollout   tokens, masks, old log-probs
    score(rollout, tokenizer, sources, weights)   -> Scores    per source, per answer
    compute_advantages(algo, ...)                 -> rewards, advantages, returns   (an Experience)
    update_policy(actor, batch, algo, ...)        -> actor loss + stats   (clipped objective)
    update_critic(critic, batch, ...)             -> critic loss + stats  (PPO only)

Each takes typed hyper-parameters (an AlgoSettings, GenerationParams, floats), not a config.
The statistics that define an algorithm are reduced across ranks by the caller where they span
rollout batches (whitening: ppo.whiten_experiences); group baselines are local by construction
(the G answers to a prompt are generated on one rank, in one rollout batch).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch

from ..engine.hybrid import GenerationParams
from ..models.load import (accepts_logit_positions, accepts_logits_to_keep, model_inputs, shared_prefix,
                           unwrap)
from ..rewards import Scores, ScoringBatch, score_batch
from ..rl import (AlgoSettings, clipped_policy_loss, discounted_returns, entropy_from_logits,
                  gae_advantages, gather_logprobs, group_advantages, kl_shaped_rewards, masked_mean,
                  response_mask, rloo_advantages, sequence_to_tokens, value_loss)

__all__ = ["Experience", "Rollout", "rollout", "recompute_logprobs", "forward_logprobs", "answer_logits", "shared_prompt_logits",
           "answer_values", "ended_with_eos", "logprob_gap_stats", "scoring_batch", "score",
           "compute_advantages", "update_policy", "update_critic"]


# ---------------------------------------------------------------------------- model forwards

def answer_logits(model, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                  group_size: int = 1) -> torch.Tensor:
    """The model's logits for each answer token: forward over prompt + answer, sliced. [B, R, V]

    In the model's dtype and not yet divided by the rollout temperature: pass `temperature` to
    gather_logprobs / entropy_from_logits, which divide after upcasting to fp32.
    group_size > 1 (rows may share a prompt): each distinct prompt is forwarded once, see
    shared_prompt_logits; the same logits, the full forward below where that does not apply."""
    if group_size > 1:
        logits = shared_prompt_logits(model, seq, mask, prompt_len)
        if logits is not None:
            return logits
    answer_len = seq.shape[1] - prompt_len
    if accepts_logit_positions(model):
        # The vocabulary projection only where an answer token is predicted (positions P - 1 ..
        # T - 2): the prompt's logits are never needed, and the [B, R, V] logits come out
        # contiguous (a slice of R + 1 positions would be copied, and its backward zero-filled).
        keep = torch.arange(prompt_len - 1, seq.shape[1] - 1, device=seq.device)
        return model(**model_inputs(model, seq, mask), use_cache=False, logits_to_keep=keep).logits
    if accepts_logits_to_keep(model):
        out = model(**model_inputs(model, seq, mask), use_cache=False, logits_to_keep=answer_len + 1)
        logits = out.logits[:, :-1]
    else:
        out = model(**model_inputs(model, seq, mask), use_cache=False)
        logits = out.logits[:, prompt_len - 1:-1]
    return logits


def shared_prompt_logits(model, seq: torch.Tensor, mask: torch.Tensor,
                         prompt_len: int) -> torch.Tensor | None:
    """answer_logits with each distinct prompt forwarded once: GRPO's G answers to a prompt
    would otherwise recompute its (often longer) prompt G times. [B, R, V], or None where this
    does not apply (the caller runs the full forward).

    The distinct prompts (tokens and left padding, found in the data, so a shuffled micro-batch
    shares too) go forward once with a KV cache; the cache is indexed out to every row (a
    differentiable gather: the answers' gradients reach the prompt's keys and values, and the
    weights, as in the full forward); the answers continue it at the positions model_inputs
    gives. Answer token 0 is predicted by the prompt's last position, token t by answer token
    t - 1 (the last answer token predicts nothing and is not forwarded). Not for models without
    position ids (ALiBi), a cache argument or a plain DynamicCache, nor under gradient
    checkpointing in training (Transformers drops the cache). With dropout, the answers to one
    prompt share one draw of its dropout."""
    P, R = prompt_len, seq.shape[1] - prompt_len
    hf = unwrap(model)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in hf.modules())
    if R < 1 or (hf.training and checkpointing):
        return None
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    if (shared := shared_prefix(model, seq, mask, P, **keep)) is None:
        return None
    out, cache, rows = shared
    first = out.logits[:, -1:][rows]   # [B, 1, V]: answer token 0
    if R == 1:
        return first
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:-1]
    out = model(**model_inputs(model, seq[:, P:-1], mask[:, :-1], positions), use_cache=True, **cache)
    return torch.cat([first, out.logits], dim=1)


def answer_values(critic, seq, mask, prompt_len: int) -> torch.Tensor:
    """Critic value of the state before each answer token. [B, R]"""
    return critic(seq, mask)[:, prompt_len - 1:-1]


@torch.no_grad()
def forward_logprobs(model, seq, mask, prompt_len: int, temperature: float, device,
                     eval_mode: bool = False, group_size: int = 1) -> torch.Tensor:
    """Log-probs of the answer tokens under softmax(logits / T) of `model` (wherever it lives:
    an offloaded model runs on its own device), fp32 on `device`. [B, R]

    group_size > 1: rows share prompts (G answers each), forwarded once (answer_logits)."""
    target = next(model.parameters()).device
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        logits = answer_logits(model, seq.to(target), mask.to(target), prompt_len, group_size)
    finally:
        if eval_mode and was_training:
            model.train()
    return gather_logprobs(logits, seq[:, prompt_len:].to(target),
                           temperature=temperature).float().to(device)


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


def ended_with_eos(answer, action_mask, eos_id) -> torch.Tensor:
    """[B] bool: the answer ended with an EOS (the others hit max_answer_seq_len)."""
    last = (action_mask.sum(1) - 1).clamp(min=0).long()
    return answer.gather(1, last.unsqueeze(1)).squeeze(1) == eos_id


# ---------------------------------------------------------------------------- 1. rollout

@dataclass
class Rollout:
    """Answers sampled from the policy. Prompts left-padded to the batch's longest prompt P,
    answers right-padded to the longest answer R; the G answers to one prompt are consecutive
    rows. `action_mask` [N, R] marks answer tokens up to and including the first EOS."""
    sequences: torch.Tensor        # [N, P + R]
    attention_mask: torch.Tensor   # [N, P + R]
    action_mask: torch.Tensor      # [N, R]
    prompt_len: int
    logprobs: torch.Tensor         # [N, R] old log-probs
    ended: torch.Tensor            # [N] bool: stopped with an EOS
    group_size: int = 1
    rows: list = field(default_factory=list)   # the prompt row of each answer (prompt data rows)
    stats: dict = field(default_factory=dict)
    entropy: torch.Tensor | None = None        # [N, R] entropy of each sampling step (rollout log)


@torch.no_grad()
def rollout(hybrid, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: GenerationParams,
            *, n_samples: int = 1, rows: list | None = None, device=None) -> Rollout:
    """Sample `n_samples` answers per prompt in generation mode (gathered / merged weights, KV
    cache, no dropout).

    Old log-probs come from the generation logits; `recompute_logprobs` replaces them by a
    forward of the training module, which agrees with the training forward in bf16/fp16 where
    the KV-cached generation does not.
    """
    dev = device if device is not None else input_ids.device
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    if n_samples > 1:
        input_ids = input_ids.repeat_interleave(n_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(n_samples, dim=0)
        rows = [r for r in rows for _ in range(n_samples)] if rows is not None else None
    P = input_ids.shape[1]
    t0 = time.time()
    gen = hybrid.generate(input_ids, attention_mask, params, return_logprobs=True, shared_prompts=n_samples > 1)
    t_gen = time.time() - t0
    answer = gen.sequences[:, P:]
    action_mask = response_mask(answer, params.eos_token_id)
    R = max(int(action_mask.sum(1).max().item()), 1)
    answer, action_mask = answer[:, :R], action_mask[:, :R]
    answer = torch.where(action_mask.bool(), answer, torch.full_like(answer, params.pad_token_id))
    seq = torch.cat([input_ids, answer], dim=1)
    mask = torch.cat([attention_mask, action_mask.long()], dim=1)
    logprobs = gen.logprobs[:, :R].float() * action_mask
    ended = ended_with_eos(answer, action_mask, params.eos_token_id)
    entropy = gen.entropy[:, :R].float() * action_mask if gen.entropy is not None else None
    return Rollout(seq, mask, action_mask, P, logprobs, ended, n_samples, list(rows or []),
                   {"time/generate": t_gen}, entropy)


@torch.no_grad()
def recompute_logprobs(ro: Rollout, model, temperature: float) -> None:
    """Replace the rollout's old log-probs (from the generation logits) by those of a forward of
    the training module `model` in eval mode, and log their gap (`rollout/logprob_gap[_max]`)."""
    act = ro.action_mask
    logprobs = forward_logprobs(model, ro.sequences, ro.attention_mask, ro.prompt_len, temperature,
                                act.device, eval_mode=True, group_size=ro.group_size) * act
    gap = (logprobs - ro.logprobs).abs() * act
    ro.stats.update({"rollout/logprob_gap": (gap.sum() / act.sum().clamp(min=1)).item(),
                     "rollout/logprob_gap_max": gap.max().item()})
    ro.logprobs = logprobs


# ---------------------------------------------------------------------------- the experience

@dataclass
class Experience:
    """One rollout batch. Answer-aligned tensors are [B, R]; `sequences` is [B, P + R].

    ref_logprobs is None without a reference model (KL coefficient 0), values None without a
    critic. The G answers to one prompt are consecutive rows (group_size G); `rows` holds each
    answer's prompt-data row, `accuracy` [B] the first correctness verifier's verdict,
    `reward_parts` each answer's score from every reward source."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    group_size: int = 1
    rows: list | None = None
    accuracy: torch.Tensor | None = None
    reward_parts: list | None = None  # per answer {source: raw score} (the rollout log's "rewards")
    entropy: torch.Tensor | None = None  # [B, R] the sampling distribution's entropy per token
    # {"actor" / "critic": [B, P + R, hidden]} the frozen trunk's output over `sequences`
    # (chatrl.engine.trunk), recorded while scoring and replayed by the training forwards
    trunk: dict | None = None

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows `idx`, with columns no row of them uses trimmed (left prompt pad, right answer pad)."""
        ids = idx.tolist()
        sub = {}
        for f in fields(self):
            v = getattr(self, f.name)
            sub[f.name] = v[idx] if isinstance(v, torch.Tensor) else \
                ([v[i] for i in ids] if isinstance(v, list) else v)
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
            elif k == "trunk" and v:
                out[k] = {role: t[idx][:, start:P + end] for role, t in v.items()}
            else:
                out[k] = v
        out["prompt_len"] = P - start
        return Experience(**out)

    @classmethod
    def concat(cls, exps: list["Experience"], pad_id: int = 0) -> "Experience":
        """Several experiences as one: prompts left-padded to the longest prompt, answers and
        answer-aligned tensors right-padded to the longest answer (pad: `pad_id` / 0)."""
        P = max(e.prompt_len for e in exps)
        R = max(e.action_mask.shape[1] for e in exps)

        def pad(t, left, right, value):
            return torch.nn.functional.pad(t, (left, right), value=value)

        out = {}
        for f in fields(cls):
            vals = [getattr(e, f.name) for e in exps]
            if f.name in ("sequences", "attention_mask"):
                out[f.name] = torch.cat([pad(v, P - e.prompt_len, R - e.action_mask.shape[1],
                                             pad_id if f.name == "sequences" else 0)
                                         for v, e in zip(vals, exps)])
            elif vals[0] is None:
                out[f.name] = None
            elif f.name == "trunk":  # kept where no row needs padding (states of pads unknown)
                same = all(e.prompt_len == P and e.action_mask.shape[1] == R and v is not None
                           and v.keys() == vals[0].keys() for v, e in zip(vals, exps))
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]} if same else None
            elif isinstance(vals[0], torch.Tensor) and vals[0].dim() == 2:
                out[f.name] = torch.cat([pad(v, 0, R - v.shape[1], 0) for v in vals])
            elif isinstance(vals[0], torch.Tensor):
                out[f.name] = torch.cat(vals)
            elif isinstance(vals[0], list):
                out[f.name] = [x for v in vals for x in v]
            else:
                out[f.name] = vals[0]
        out["prompt_len"] = P
        return cls(**out)

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


# ---------------------------------------------------------------------------- 2. score

def scoring_batch(ro: Rollout, tokenizer) -> ScoringBatch:
    """The rollout's answers in the forms reward sources take (see rewards.ScoringBatch)."""
    P = ro.prompt_len
    n = ro.action_mask.sum(1).long().tolist()
    ids = [ro.sequences[i, P:P + n[i]].tolist() for i in range(len(n))]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rows = ro.rows or [{} for _ in texts]
    prompts, completions = [], []
    for row, text in zip(rows, texts):
        chat = row.get("conversational", True) and "messages" in row
        prompts.append(row.get("messages") if chat else row.get("prompt", ""))
        completions.append([{"role": "assistant", "content": text}] if chat else text)
    names = sorted({k for r in rows for k in (r.get("columns") or {})})
    columns = {k: [(r.get("columns") or {}).get(k) for r in rows] for k in names}
    return ScoringBatch(prompts=prompts, completions=completions, texts=texts, columns=columns,
                        completion_ids=ids, sequences=ro.sequences, attention_mask=ro.attention_mask,
                        shared_prompt_len=P if ro.group_size > 1 else None)


def score(ro: Rollout, tokenizer, sources, weights, *, skip_bad: bool = False) -> Scores:
    """Every reward source on the rollout's answers; total = sum of weight x score. [N]"""
    return score_batch(sources, weights, scoring_batch(ro, tokenizer), skip_bad=skip_bad,
                       device=ro.sequences.device)


# ---------------------------------------------------------------------------- 3. advantages

def compute_advantages(algo: AlgoSettings, *, scores: torch.Tensor, logprobs: torch.Tensor,
                       ref_logprobs: torch.Tensor | None, values: torch.Tensor | None,
                       action_mask: torch.Tensor, group_size: int, kl_coef: float,
                       clip_reward: float | None, gamma: float = 1.0, lam: float = 0.95
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, advantages, returns), each [N, R], by the algorithm's estimator.

    rewards: the per-token rewards — the score at the last answer token, minus
    kl_coef x KL_t on every token when the KL sits in the reward (kl_shaped_rewards); 0 KL
    without a reference model. Then

        gae           A, returns = GAE(rewards, values)                   (critic)
        grpo / rloo   A_t = group baseline of the answer's summed reward, on every token
        reinforce_pp  A_t = returns_t = discounted sum of rewards from t  (whitened by the caller)

    The score is clipped to +-clip_reward for GAE only (PPO's reward-model scores); verifiable
    rewards stay as they are. Advantages are not yet whitened.
    """
    coef = kl_coef if algo.kl_in_reward and ref_logprobs is not None else 0.0
    ref = ref_logprobs if ref_logprobs is not None else logprobs
    rewards = kl_shaped_rewards(logprobs, ref, scores, action_mask, kl_coef=coef,
                                clip_reward=clip_reward if algo.estimator == "gae" else None,
                                estimator=algo.kl_estimator)
    if algo.estimator == "gae":
        if values is None:
            raise ValueError("the gae estimator needs the critic's values")
        advantages, returns = gae_advantages(rewards, values, action_mask, gamma, lam)
    elif algo.estimator in ("grpo", "rloo"):
        total = rewards.sum(dim=1)  # = score - coef * sum_t KL_t
        seq = (group_advantages(total, group_size, algo.scale_std) if algo.estimator == "grpo"
               else rloo_advantages(total, group_size))
        advantages = sequence_to_tokens(seq, action_mask)
        returns = advantages
    elif algo.estimator == "reinforce_pp":
        returns = discounted_returns(rewards, action_mask, gamma)
        advantages = returns.clone()
    else:
        raise ValueError(f"unknown advantage estimator {algo.estimator!r}")
    return rewards, advantages, returns


# ---------------------------------------------------------------------------- 4. update

def replay(share, model, trunk: dict | None):
    """The TrunkShare's reuse context for recorded states `trunk` (an Experience's; a no-op
    without a share or states for its role)."""
    if share is None or not trunk or share.role not in trunk:
        return nullcontext()
    return share.reuse(model, trunk[share.role])


def update_policy(actor, exp, algo: AlgoSettings, *, temperature: float, max_len: int,
                  scale: float = 1.0, measure_gap: bool = False, trunk=None) -> tuple[torch.Tensor, dict]:
    """One actor micro-batch: forward, the clipped objective of `algo` (aggregation, ratio level,
    clip range, KL in the loss), backward (x `scale`, see ppo.token_scales) and the engine step
    (an optimizer step at an accumulation boundary). Returns (loss, stats as floats).

    measure_gap: no optimizer step happened since the rollout, so any difference between the old
    log-probs and this forward is rollout/training mismatch; its size is returned.
    trunk: the actor's TrunkShare, which replays exp.trunk["actor"] (the frozen blocks' output)."""
    P, mask, act = exp.prompt_len, exp.attention_mask, exp.action_mask
    with replay(trunk, actor, exp.trunk):
        logits = answer_logits(actor, exp.sequences, mask, P, exp.group_size)
    logprobs = gather_logprobs(logits, exp.sequences[:, P:], temperature=temperature)
    loss, st = clipped_policy_loss(
        logprobs, exp.logprobs, exp.advantages, act, clip_low=algo.clip_low,
        clip_high=algo.clip_high, ratio_level=algo.ratio_level, aggregation=algo.aggregation,
        max_len=max_len, ref_logprobs=exp.ref_logprobs if algo.kl_in_loss else None,
        kl_coef=algo.kl_coef if algo.kl_in_loss else 0.0, kl_estimator=algo.kl_estimator)
    gap = {}
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.detach(), temperature=temperature), act)
        if measure_gap:
            gap = logprob_gap_stats(logprobs.detach(), exp.logprobs, act)
    actor.backward(loss * scale if scale != 1.0 else loss)
    actor.step()
    stats = {"loss/actor": loss.item(), "policy/clipfrac": float(st["clipfrac"]),
             "policy/clipfrac_low": float(st["clipfrac_low"]),
             "policy/clipfrac_high": float(st["clipfrac_high"]),
             "policy/approx_kl": float(st["approx_kl"]), "policy/ratio": float(st["ratio_mean"]),
             "policy/entropy": entropy.item(), **gap}
    if "kl" in st:
        stats["policy/kl_loss"] = float(st["kl"])
    return loss.detach(), stats


def update_critic(critic, exp, cliprange_value: float, scale: float = 1.0,
                  trunk=None) -> tuple[torch.Tensor, dict]:
    """One critic micro-batch: the clipped value loss against the returns, backward, step.
    trunk: the critic's TrunkShare (see update_policy)."""
    with replay(trunk, critic, exp.trunk):
        values = answer_values(critic, exp.sequences, exp.attention_mask, exp.prompt_len)
    loss, st = value_loss(values, exp.values, exp.returns, exp.action_mask, cliprange_value)
    critic.backward(loss * scale if scale != 1.0 else loss)
    critic.step()
    return loss.detach(), {"loss/critic": loss.item(), "value/clipfrac": float(st["vf_clipfrac"])}
