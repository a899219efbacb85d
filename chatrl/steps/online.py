"""The data and reward side of step 3's loop (run_ppo): the prompt stream, prompt data, the reward
sources, and the collect stage (stages 1-3 for one update, with DAPO's dynamic sampling)."""

from __future__ import annotations

import torch

from ..data import collate_prompts
from ..engine import ds
from ..logging import write_line
from ..models import resolve_model_path
from ..rl import informative_groups
from . import common
from .stages import Experience

__all__ = ["PromptStream", "load_prompts", "reward_model_path", "reward_sources", "collect_experience"]


def reward_model_path(cfg) -> str | None:
    """The frozen reward model's folder, or None when the run has no reward model: the explicit
    --reward-model-name-or-path; else, when no reward function or server is given, the critic's
    starting folder (PPO's default)."""
    if cfg.reward_model_name_or_path:
        return resolve_model_path(cfg.reward_model_name_or_path)
    if not cfg.reward_fn and not cfg.reward_url and cfg.critic_model_name_or_path:
        return resolve_model_path(cfg.critic_model_name_or_path)
    return None


class PromptStream:
    """The global rollout batches of prompt indices, epoch after epoch (seeded shuffle per epoch,
    `per_epoch` batches each); `state` (epoch, batch) goes into checkpoints, so a resumed run
    draws the same prompts. Dynamic sampling draws more batches per iteration than plain runs."""

    def __init__(self, n_rows: int, seed: int, global_batch: int, per_epoch: int,
                 epoch: int = 0, batch: int = 0):
        self.n_rows, self.seed, self.global_batch, self.per_epoch = n_rows, seed, global_batch, per_epoch
        self.epoch, self.batch = epoch, batch
        self._order: tuple[int, list] | None = None

    def next(self) -> list[int]:
        if self.batch >= self.per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, common.epoch_batches(self.n_rows, self.seed, self.epoch,
                                                            self.global_batch))
        rows = self._order[1][self.batch]
        self.batch += 1
        return rows

    def state(self) -> dict:
        epoch, batch = (self.epoch + 1, 0) if self.batch >= self.per_epoch else (self.epoch, self.batch)
        return {"epoch": epoch, "batch_in_epoch": batch}


def load_prompts(cfg, tokenizer, template: str, name: str):
    """(train, eval) prompt rows with `prompt_input_ids`: step 3's slice of the preference data
    for `chatrl ppo`; prompt data with columns (chatrl.data.prompts) for `chatrl grpo` / `rl`."""
    if not hasattr(cfg, "algo"):
        train, ev, stats = common.step_datasets(cfg, tokenizer, template, "prompt", 3,
                                                cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                                                cfg.max_prompt_seq_len)
        dropped = stats["train"].get("dropped_long_prompts", 0)
    else:
        from ..data.prompts import load_prompt_data, tokenize_prompts

        data = load_prompt_data(list(cfg.data_path), seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows)
        train, dropped = tokenize_prompts(data.train, tokenizer, template, cfg.max_prompt_seq_len)
        ev, _ = tokenize_prompts(data.eval, tokenizer, template, cfg.max_prompt_seq_len)
    write_line(f"{name}: {len(train)} prompts ({dropped} longer than {cfg.max_prompt_seq_len} "
               f"tokens dropped), {template} format")
    return train, ev


DEFAULT_VERIFIERS = {"arith": "numeric", "openai/gsm8k": "numeric", "hendrycks/competition_math": "math",
                     "competition_math": "math", "DigitalLearningGmbH/MATH-lighteval": "math"}


def reward_sources(cfg) -> tuple[list, list[float]]:
    """The run's reward sources and weights (chatrl.rewards), built before any model loads so a
    bad --reward-fn fails at once; the reward-model source gets its model after build_models.
    With none given, prompt data with a checkable answer (arith, gsm8k, competition math) gets
    its verifier."""
    from ..rewards.functions import build_reward_sources
    from ..rewards.model import RewardModelSource

    has_rm = reward_model_path(cfg) is not None
    fns = list(cfg.reward_fn)
    if not fns and not has_rm and not cfg.reward_url:
        known = {DEFAULT_VERIFIERS.get(str(p).split(":")[0]) for p in cfg.data_path}
        if len(known) == 1 and None not in known:
            fns = [known.pop()]
            write_line(f"reward: the built-in `{fns[0]}` verifier against the data's answers "
                       "(choose others with --reward-fn)")
    return build_reward_sources(
        fns, reward_model=RewardModelSource(None, "model") if has_rm else None,
        reward_url=cfg.reward_url, weights=cfg.reward_weights, answer_column=cfg.answer_column,
        format_pattern=cfg.format_pattern, timeout=cfg.reward_timeout, retries=cfg.reward_retries)


def collect_experience(trainer, stream: PromptStream, prompts, n_batches: int,
                       gb: int, rank: int, max_rounds: int) -> tuple[list[Experience], list[dict], dict]:
    """Stages 1-3 for one update: `n_batches` rollout batches of `gb` prompts on this rank.

    With dynamic sampling (DAPO), groups whose answers all scored the same are dropped and more
    batches are drawn until every rank holds n_batches x gb informative groups (at most
    max_rounds x n_batches batches; then dropped groups fill the rest, counted); the kept groups
    become one experience. Returns (experiences, per-batch stats, sampling stats)."""
    tok = trainer.tokenizer

    def one_batch():
        rows = stream.next()[rank * gb:(rank + 1) * gb]
        data = [prompts[i] for i in rows]
        batch = collate_prompts(data, tok.pad_token_id)
        exp = trainer.make_experience(batch["input_ids"], batch["attention_mask"], rows=data)
        return exp, dict(trainer.last_stats)

    if not trainer.algo.dynamic_sampling:
        pairs = [one_batch() for _ in range(n_batches)]
        return [p[0] for p in pairs], [p[1] for p in pairs], {}
    G, target = trainer.algo.num_generations, n_batches * gb
    kept, spare, stats, rounds = [], [], [], 0
    while True:
        exp, st = one_batch()
        stats.append(st)
        rounds += 1
        keep = informative_groups(exp.scores.cpu(), G)
        for part, mask in ((kept, keep), (spare, ~keep)):
            idx = torch.nonzero(mask.repeat_interleave(G)).flatten()
            if len(idx):
                part.append(exp.select(idx))
        have = sum(e.batch_size for e in kept) // G
        # every rank keeps drawing until all have enough (generation is collective under ZeRO-3)
        short = ds.all_reduce_sum(torch.tensor([float(have < target)], dtype=torch.float64)).item()
        if short == 0 or rounds >= max_rounds * n_batches:
            break
    filled = max(target - have, 0)
    parts = kept + spare
    exp = Experience.concat(parts, tok.pad_token_id).select(torch.arange(target * G))
    return [exp], stats, {"sampling/rounds": float(rounds), "sampling/filled_groups": float(filled)}
