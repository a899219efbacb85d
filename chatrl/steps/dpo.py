"""DPO — direct preference optimisation from step-2 pairs, the offline alternative to steps 2 + 3.

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])

log-probabilities are summed over the response tokens (EOS included, prompt and padding not).
The reference is a frozen copy of the starting model (or --ref-model-name-or-path). Output: a
Hugging Face folder like step 1's, usable by chat, serve and as a PPO actor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data import collate_pairs
from ..engine import ds
from ..engine.rlhf import _frozen
from ..logging import write_line
from ..models import load_causal_lm, resolve_model_path
from ..models.load import check_same_tokenizer, model_inputs
from ..rl import dpo_loss, next_token_logprobs
from . import common
from .sft import engine_spec, loop_spec, maybe_lora


def response_logps(model, batch: dict, prompt_lens: torch.Tensor, device) -> torch.Tensor:
    """Sum of log p(token) over each row's response tokens. [rows] for a collate_pairs batch."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    logits = model(**model_inputs(model, ids, mask), use_cache=False).logits
    logps = next_token_logprobs(logits, ids)
    positions = torch.arange(1, ids.shape[1], device=device).unsqueeze(0)
    answer = (positions >= prompt_lens.to(device).unsqueeze(1)) & mask[:, 1:].bool()
    return (logps * answer).sum(-1)


@ds.releases_engines
def run_dpo(cfg) -> Path:
    # 0. set-up
    run, model_path, tokenizer, template = common.prepare_step(cfg, "dpo")
    if run.finished:  # --resume of a finished step
        return run.finished

    # 1. data: step 2's pairs
    train_ds, eval_ds, _ = common.step_datasets(cfg, tokenizer, template, "rm", 2, cfg.max_seq_len)
    write_line(f"dpo: {len(train_ds)} training pairs, {len(eval_ds)} eval pairs ({template} format)")

    # 2. policy (trained) + reference (frozen)
    spec = loop_spec(cfg)
    total = common.total_steps(len(train_ds), spec, run.world)
    if cfg.ref_model_name_or_path:
        check_same_tokenizer(model_path, resolve_model_path(cfg.ref_model_name_or_path),
                             ("policy", "reference model"))
    model = load_causal_lm(model_path, dtype="fp32", dropout=cfg.dropout, tokenizer=tokenizer)
    ref_model = (load_causal_lm(resolve_model_path(cfg.ref_model_name_or_path), dropout=0.0,
                                tokenizer=tokenizer)
                 if cfg.ref_model_name_or_path else copy.deepcopy(model))  # eval mode: no dropout
    ref = _frozen(ref_model, cfg.zero_stage, run.dtype, offload_to_cpu=cfg.offload_reference_model)
    engine = ds.build_engine(maybe_lora(model, cfg), engine_spec(cfg, run.dtype, total))
    pad = tokenizer.pad_token_id

    def collate(rows):
        batch = collate_pairs(rows, pad)
        batch["prompt_len"] = torch.tensor([r["prompt_len"] for r in rows] * 2)
        return batch

    def pair_loss(model_, batch):
        n = batch["input_ids"].shape[0] // 2
        dev = next(ref.parameters()).device
        policy = response_logps(model_, batch, batch["prompt_len"], dev)
        with torch.no_grad():
            reference = response_logps(ref, batch, batch["prompt_len"], dev)
        loss, stats = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:],
                               beta=cfg.beta, label_smoothing=cfg.label_smoothing)
        return loss, stats, n

    def loss_fn(eng, batch):
        loss, stats, n = pair_loss(eng, batch)
        return loss * n, {"reward_accuracy": float(stats["reward_accuracy"]) * n,
                          "margin": float(stats["margin"]) * n}

    @torch.no_grad()
    def evaluate() -> dict:
        engine.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for rows in common.eval_batches(len(eval_ds), cfg.per_device_eval_batch_size, cfg.eval_iters,
                                        ds.rank(), ds.world_size()):
            loss, stats, n = pair_loss(engine, collate([eval_ds[i] for i in rows]))
            sums += torch.tensor([loss.item() * n, float(stats["reward_accuracy"]) * n,
                                  float(stats["margin"]) * n, n], dtype=torch.float64)
        engine.train()
        sums = ds.all_reduce_sum(sums)
        n = max(sums[3].item(), 1)
        return {"eval/loss": sums[0].item() / n, "accuracy": sums[1].item() / n,
                "margin": sums[2].item() / n, "eval/pairs": n}

    # 3-4. train
    last_eval = common.supervised_loop(run, engine, train_ds, spec, collate=collate, loss_fn=loss_fn,
                                       units_fn=lambda row: 1,
                                       evaluate=evaluate if len(eval_ds) else None, unit_name="pairs")
    # 5. save
    final = common.save_final(run, engine, tokenizer, {"step": "dpo", "template": template,
                                                       "base_model": model_path, "eval": last_eval})
    write_line(f"dpo: done; model saved to {final}"
               + (f" (eval implicit-reward accuracy {last_eval['accuracy']:.3f})" if last_eval else ""))
    common.finish_run(run)
    return final
