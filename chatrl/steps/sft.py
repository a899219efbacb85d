"""Step 1 — supervised fine-tuning: next-token cross-entropy on the response tokens.

    loss = sum over label tokens of -log p(token | prefix)  /  label tokens in the global batch

Prompt tokens are masked (labels -100) unless --train-on-prompt; every response ends with the
EOS, which is a label, so the model learns to stop. Evaluation: perplexity on held-out rows.
Output: a Hugging Face folder (merged LoRA, tokenizer, chatrl.json, run_config.yaml).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import collate_sft
from ..engine import ds
from ..logging import progress_iter, write_line
from ..models import load_causal_lm
from ..models.freeze import report_trainable
from ..models.lora import apply_lora
from ..rl import sft_loss, token_counts
from . import common


def engine_spec(cfg, dtype: str, total: int) -> ds.EngineSpec:
    """The DeepSpeed set-up of a step-1/2 model, from its config (shared with RM and DPO)."""
    return ds.EngineSpec(zero_stage=cfg.zero_stage, offload=cfg.offload, dtype=dtype,
                         micro_batch=cfg.per_device_train_batch_size,
                         grad_accum=cfg.gradient_accumulation_steps, grad_clip=cfg.max_grad_norm,
                         lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                         lora_lr=cfg.lora_learning_rate, scheduler=cfg.lr_scheduler_type,
                         warmup_steps=cfg.num_warmup_steps, total_steps=total,
                         gradient_checkpointing=cfg.gradient_checkpointing,
                         deepspeed_config=cfg.deepspeed_config)


def loop_spec(cfg) -> common.LoopSpec:
    return common.LoopSpec(micro_batch=cfg.per_device_train_batch_size,
                           grad_accum=cfg.gradient_accumulation_steps, epochs=cfg.num_train_epochs,
                           max_steps=cfg.max_steps, eval_interval=cfg.eval_interval,
                           checkpoint_interval=cfg.checkpoint_interval, log_interval=cfg.log_interval,
                           seed=cfg.seed, progress=cfg.progress)


def maybe_lora(model, cfg):
    """LoRA adapters (--lora-dim), then the frozen lower layers (--num-layers-unfrozen)."""
    if cfg.lora_dim > 0:
        model = apply_lora(model, cfg.lora_dim, cfg.lora_alpha, cfg.lora_module_name,
                           only_optimize=cfg.only_optimize_lora)
    report_trainable(model, cfg.num_layers_unfrozen)
    return model


def label_tokens(row: dict, train_on_prompt: bool) -> int:
    """Tokens that are predicted (labels after the one-token shift) in a tokenized SFT row."""
    n = len(row["input_ids"])
    return n - 1 if train_on_prompt else n - row["prompt_len"]


@ds.releases_engines
def run_sft(cfg) -> Path:
    # 0. set-up
    run, model_path, tokenizer, template = common.prepare_step(cfg, "sft")
    if run.finished:  # --resume of a finished step
        return run.finished

    # 1. data: this step's slice, tokenized without padding, cached
    train_ds, eval_ds, stats = common.step_datasets(cfg, tokenizer, template, "sft", 1, cfg.max_seq_len)
    write_line(f"sft: {len(train_ds)} training rows, {len(eval_ds)} eval rows ({template} format)")

    # 2. model + engine
    spec = loop_spec(cfg)
    total = common.total_steps(len(train_ds), spec, run.world)
    model = load_causal_lm(model_path, dtype="fp32", dropout=cfg.dropout, tokenizer=tokenizer)
    model = maybe_lora(model, cfg)
    engine = ds.build_engine(model, engine_spec(cfg, run.dtype, total))
    pad = tokenizer.pad_token_id

    def collate(rows):
        return collate_sft(rows, pad, train_on_prompt=cfg.train_on_prompt)

    def loss_fn(eng, batch):
        dev = eng.device
        out = eng(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                  use_cache=False)
        logits = out.logits.float() if cfg.compute_fp32_loss else out.logits
        return sft_loss(logits, batch["labels"].to(dev), reduction="sum"), {}

    def evaluate() -> dict:
        return evaluate_perplexity(engine, eval_ds, collate, cfg.per_device_eval_batch_size,
                                   cfg.eval_iters, cfg.progress)

    # 3-4. train (resume, log, eval, checkpoint)
    last_eval = common.supervised_loop(
        run, engine, train_ds, spec, collate=collate, loss_fn=loss_fn,
        units_fn=lambda row: label_tokens(row, cfg.train_on_prompt),
        evaluate=evaluate if len(eval_ds) else None, unit_name="label_tokens")

    # 5. save
    final = common.save_final(run, engine, tokenizer, {"step": "sft", "template": template,
                                                       "base_model": model_path, "eval": last_eval})
    write_line(f"sft: done; model saved to {final}"
               + (f" (eval perplexity {last_eval['perplexity']:.3f})" if last_eval else ""))
    common.finish_run(run)
    return final


@torch.no_grad()
def evaluate_perplexity(engine, eval_ds, collate, batch: int, max_batches: int,
                        progress_bars: bool = True) -> dict:
    was_training = engine.module.training
    engine.eval()
    nll, count = 0.0, 0
    for rows in progress_iter(common.eval_batches(len(eval_ds), batch, max_batches, ds.rank(),
                                                  ds.world_size()), "sft eval", enabled=progress_bars):
        b = collate([eval_ds[i] for i in rows])
        dev = engine.device
        out = engine(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                     use_cache=False)
        labels = b["labels"].to(dev)
        nll += sft_loss(out.logits.float(), labels, reduction="sum").item()
        count += int(token_counts(labels).sum())
    tot = ds.all_reduce_sum(torch.tensor([nll, count], dtype=torch.float64))
    if was_training:
        engine.train()
    loss = tot[0].item() / max(tot[1].item(), 1)
    return {"eval/loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval/tokens": tot[1].item()}
