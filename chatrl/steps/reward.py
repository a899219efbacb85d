"""Step 2 — reward model: backbone + value head, scored at the last non-pad token (the EOS).

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)

(--rm-loss dschat: DeepSpeed-Chat's mean over the tokens after the first divergence.)
Evaluation: accuracy (share of pairs with r_chosen > r_rejected), mean chosen/rejected scores.
Output: a folder that `RewardModel.from_pretrained` loads back to identical scores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import collate_pairs
from ..engine import ds
from ..logging import progress_iter, write_line
from ..models.reward import RewardModel, gather_last
from ..rl import dschat_pairwise_loss, pairwise_loss
from . import common
from .sft import engine_spec, loop_spec, maybe_lora


def pair_scores(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B], per-token values [2B, T]) of a collate_pairs batch."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    values = model(ids, mask)
    scores = gather_last(values, mask)
    half = ids.shape[0] // 2
    return scores[:half], scores[half:], values


@ds.releases_engines
def run_rm(cfg) -> Path:
    # 0. set-up
    run, model_path, tokenizer, template = common.prepare_step(cfg, "rm")
    if run.finished:  # --resume of a finished step
        return run.finished

    # 1. data
    train_ds, eval_ds, stats = common.step_datasets(cfg, tokenizer, template, "rm", 2, cfg.max_seq_len)
    write_line(f"rm: {len(train_ds)} training pairs, {len(eval_ds)} eval pairs ({template} format)")

    # 2. model + engine
    spec = loop_spec(cfg)
    total = common.total_steps(len(train_ds), spec, run.world)
    model = RewardModel.from_pretrained(model_path, dtype="fp32", dropout=cfg.dropout, tokenizer=tokenizer)
    model = maybe_lora(model, cfg)
    engine = ds.build_engine(model, engine_spec(cfg, run.dtype, total))
    pad = tokenizer.pad_token_id

    def collate(rows):
        return collate_pairs(rows, pad)

    def loss_fn(eng, batch):
        chosen, rejected, values = pair_scores(eng, batch, eng.device)
        n = chosen.shape[0]
        if cfg.rm_loss == "dschat":
            ids = batch["input_ids"].to(eng.device)
            mask = batch["attention_mask"].to(eng.device)
            loss, _ = dschat_pairwise_loss(values[:n], values[n:], ids[:n], ids[n:], pad,
                                           chosen_attention_mask=mask[:n],
                                           rejected_attention_mask=mask[n:])
        else:
            loss, _ = pairwise_loss(chosen, rejected)
        acc = (chosen > rejected).float().sum()
        return loss * n, {"accuracy": acc.item()}

    def evaluate() -> dict:
        return evaluate_pairs(engine, eval_ds, collate, cfg.per_device_eval_batch_size, cfg.eval_iters,
                              progress_bars=cfg.progress)

    # 3-4. train
    last_eval = common.supervised_loop(run, engine, train_ds, spec, collate=collate, loss_fn=loss_fn,
                                       units_fn=lambda row: 1,
                                       evaluate=evaluate if len(eval_ds) else None, unit_name="pairs")

    # 5. save
    final = common.save_final(run, engine, tokenizer, {"step": "rm", "template": template,
                                                       "base_model": model_path, "eval": last_eval})
    write_line(f"rm: done; model saved to {final}"
               + (f" (eval accuracy {last_eval['accuracy']:.3f})" if last_eval else ""))
    common.finish_run(run)
    return final


@torch.no_grad()
def evaluate_pairs(model, eval_ds, collate, batch: int, max_batches: int, world_rank=None,
                   progress_bars: bool = True) -> dict:
    """Accuracy and mean chosen/rejected scores over (this rank's share of) the eval pairs."""
    module = getattr(model, "module", model)
    was_training = module.training
    model.eval()
    rank, world = world_rank or (ds.rank(), ds.world_size())
    sums = torch.zeros(5, dtype=torch.float64)  # correct, chosen, rejected, n, loss
    dev = next(module.parameters()).device
    for rows in progress_iter(common.eval_batches(len(eval_ds), batch, max_batches, rank, world),
                              "rm eval", enabled=progress_bars):
        c, r, _ = pair_scores(model, collate([eval_ds[i] for i in rows]), dev)
        loss, _ = pairwise_loss(c, r)
        sums += torch.tensor([(c > r).sum().item(), c.sum().item(), r.sum().item(), len(rows),
                              loss.item() * len(rows)], dtype=torch.float64)
    sums = ds.all_reduce_sum(sums)
    if was_training:
        model.train()
    n = max(sums[3].item(), 1)
    return {"accuracy": sums[0].item() / n, "chosen_score": sums[1].item() / n,
            "rejected_score": sums[2].item() / n, "eval/loss": sums[4].item() / n, "eval/pairs": n}
