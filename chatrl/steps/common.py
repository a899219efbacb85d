"""What the steps share: run set-up, data loading, and the supervised training loop of SFT/RM/DPO.

Loss normalisation. A step's loss function returns a *sum* over its units (label tokens for SFT,
pairs for RM/DPO) and the loop divides by the number of units in the whole global batch (all
micro-batches of all ranks), multiplied back by grad_accum x world because DeepSpeed averages over
both. The gradient is then exactly that of the global mean, so batch 8 x accumulation 1 equals
batch 1 x accumulation 8, and 2 ranks equal 1 rank with the same global batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import config as C
from ..data import build_step_data, tokenize_step_data
from ..data.templates import resolve_template
from ..engine import checkpoint as ckpt
from ..engine import ds
from ..engine.flops import train_flops_per_token
from ..errors import ConfigError, DataError, OutputError
from ..logging import MetricsLogger, progress, write_line
from ..models import load_tokenizer, resolve_model_path
from ..models.load import META_FILE
from .guards import checkpoint_guard, guard_metrics, guard_weights, require_value_heads  # noqa: F401


@dataclass
class Run:
    """Per-run facts derived once from the config (never written back into it)."""
    cfg: object
    name: str
    out_dir: Path
    dtype: str
    world: int
    logger: MetricsLogger | None
    started: float = field(default_factory=time.time)
    finished: Path | None = None  # set when --resume finds the step already finished
    settings: dict = field(default_factory=dict)  # RESUME_SETTINGS of this run

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


# The settings a checkpoint is only valid with: the models, the shapes and order of the data, the
# parallel layout and precision. Resuming with any of them changed is refused, by name.
RESUME_SETTINGS = (
    "model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path",
    "reward_model_name_or_path", "ref_model_name_or_path", "per_device_train_batch_size",
    "per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
    "gradient_accumulation_steps", "zero_stage", "actor_zero_stage", "critic_zero_stage", "lora_dim",
    "actor_lora_dim", "critic_lora_dim", "seed", "data_path", "data_split", "max_seq_len",
    "max_prompt_seq_len", "max_answer_seq_len")


def final_folders(name: str) -> tuple[str, ...]:
    """The folders a finished step publishes (the first one marks the step finished)."""
    return ("actor", "critic", "actor_ema") if name == "ppo" else ("model",)


def resume_settings(cfg, world: int, dtype: str) -> dict:
    out = {"world_size": world, "dtype": dtype}
    for key in RESUME_SETTINGS:
        value = getattr(cfg, key, None)
        if value is not None and key.endswith("_name_or_path"):
            value = resolve_model_path(value)
        if hasattr(cfg, key):
            out[key] = value
    return out


def start_run(cfg, name: str) -> Run:
    """Process group, seed, output folder claimed (see claim_output), resolved config saved, logger."""
    dtype = ds.resolve_dtype(cfg.dtype)  # raises before anything is written
    for key in ("model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path",
                "reward_model_name_or_path"):
        if getattr(cfg, key, None):
            resolve_model_path(getattr(cfg, key))
    ds.init_distributed()
    ds.seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    settings = resume_settings(cfg, ds.world_size(), dtype)
    finished = claim_output(cfg, name, out, settings)
    if finished is not None:
        write_line(f"{name}: already finished; the model is at {finished} (nothing to resume; "
                   "pass --overwrite instead of --resume to train it again)")
        return Run(cfg=cfg, name=name, out_dir=out, dtype=dtype, world=ds.world_size(), logger=None,
                   finished=finished)
    failure = None
    if ds.is_main():
        try:
            prepare_output(cfg, name, out, settings)
        except OSError as e:
            failure = e
    if ds.all_reduce_sum(torch.tensor([0.0 if failure is None else 1.0])).item():
        why = os.strerror(failure.errno) if failure is not None and failure.errno else "failed on rank 0"
        raise OutputError(f"cannot write to --output-dir {out} ({why}"
                          + (f": {failure.filename}" if failure is not None and failure.filename else "")
                          + "); make it writable or choose another --output-dir") from failure
    ds.barrier()
    from ..tracking import open_trackers, parse_report_to

    logger = MetricsLogger(out, name, tensorboard=cfg.enable_tensorboard and "tensorboard" in
                           parse_report_to(cfg.report_to),
                           tensorboard_path=cfg.tensorboard_path, console=cfg.print_loss,
                           fresh=not cfg.resume)
    if ds.is_main():
        logger.trackers = open_trackers(cfg.report_to, out, name, config=cfg, project=cfg.wandb_project)
    return Run(cfg=cfg, name=name, out_dir=out, dtype=dtype,
               world=ds.world_size(), logger=logger, settings=settings)


def claim_output(cfg, name: str, out: Path, settings: dict) -> Path | None:
    """Decide, reading only (every rank), whether this run may use `out`; returns the finished
    model folder when --resume finds the step finished.

    A fresh run refuses a folder that holds another run's checkpoints or finished model (unless
    --overwrite); --resume refuses checkpoints written with different RESUME_SETTINGS.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file, not a folder; pass a folder (it is created "
                          "if missing)")
    ckpt_dir = out / "checkpoints"
    first = out / final_folders(name)[0]
    finished = first if (first / META_FILE).exists() else None
    checkpoints = ckpt.checkpoint_names(ckpt_dir)
    if cfg.resume:
        recorded = (ckpt.read_record(ckpt_dir) or {}).get("settings")
        if checkpoints and recorded:
            diffs = [f"{k} {recorded[k]} -> {v}" for k, v in settings.items()
                     if k in recorded and recorded[k] != v]
            if diffs:
                raise ConfigError(f"--resume: the checkpoints in {ckpt_dir} were written with other "
                                  f"settings ({'; '.join(diffs)}); resume with the original ones, or "
                                  "pass --overwrite instead of --resume (chatrl train: --restart) "
                                  "to start afresh")
        return finished
    if finished and not cfg.overwrite:
        raise OutputError(f"--output-dir {out} already holds a finished run ({finished}); pass "
                          "--overwrite to delete it and train again, or choose another --output-dir")
    if checkpoints and not cfg.overwrite:
        raise OutputError(f"--output-dir {out} already holds another run's checkpoints "
                          f"({', '.join(checkpoints)}); add --resume to continue that run, --overwrite "
                          "to delete it and start afresh, or choose another --output-dir")
    return None


def prepare_output(cfg, name: str, out: Path, settings: dict) -> None:
    """Rank 0, once the run owns `out`: remove what interrupted saves left, the previous run with
    --overwrite, a record without checkpoints; then write run_config.yaml."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    leftovers = [p for p in [*out.glob(".*.tmp-*"), *ckpt_dir.glob(".tmp-*")] if p.is_dir()]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    if leftovers:
        write_line(f"{name}: removed {len(leftovers)} temporary folder(s) left by an interrupted save: "
                   + ", ".join(p.name for p in leftovers))
    if cfg.overwrite:
        for folder in ("checkpoints", "tensorboard", *final_folders(name)):
            shutil.rmtree(out / folder, ignore_errors=True)
    if not (cfg.resume and ckpt.checkpoint_names(ckpt_dir)):
        (ckpt_dir / ckpt.RECORD).unlink(missing_ok=True)  # this run writes its own at its first checkpoint
    C.save_config(cfg, out / "run_config.yaml")


def resume_checkpoint(run: Run, engines: dict) -> tuple[Path, dict] | None:
    """--resume: load the newest readable checkpoint into `engines` (falling back past unreadable
    ones) and drop the metrics rows logged after it; None (and an empty log) if there is none."""
    found = ckpt.load_latest(run.ckpt_dir, engines, warn=write_line)
    if found is None:
        write_line(f"--resume: no checkpoint in {run.ckpt_dir}; starting from scratch")
        run.logger.truncate_after(0)
        return None
    run.logger.truncate_after(found[1]["step"])
    return found


def prepare_step(cfg, name: str):
    """start_run + the step's model path, tokenizer and conversation format (only the Run when
    the step is already finished)."""
    run = start_run(cfg, name)
    if run.finished:
        return run, None, None, None
    model_path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer_for(cfg, model_path)
    return run, model_path, tokenizer, template_for(cfg, tokenizer)


def load_tokenizer_for(cfg, model_path: str):
    tok = load_tokenizer(model_path)
    if cfg.add_eot_token:
        if cfg.eot_token not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [cfg.eot_token]})
        tok.eos_token = cfg.eot_token
    return tok


def resolve_model(name):
    return resolve_model_path(name)


def step_datasets(cfg, tokenizer, template: str, kind: str, step_index: int, max_seq_len: int,
                  max_prompt_len: int = 256):
    """Raw rows for this step's slice -> tokenized, cached train/eval datasets (+ stats)."""
    raw = build_step_data(list(cfg.data_path), cfg.data_split, step_index, seed=cfg.seed,
                          sft_only_data_path=list(getattr(cfg, "sft_only_data_path", []) or []),
                          weights=cfg.data_weights, skip_bad_rows=cfg.skip_bad_rows)
    cache_root = Path(cfg.data_output_path) if cfg.data_output_path else None
    out, stats = {}, {"sources": raw.stats}
    for split, rows in (("train", raw.train), ("eval", raw.eval)):
        tok_ds, st = tokenize_step_data(rows, tokenizer, step=kind, template=template,
                                        max_seq_len=max_seq_len, max_prompt_len=max_prompt_len,
                                        cache_root=cache_root)
        out[split] = tok_ds
        stats[split] = st
    skipped = sum(int(v.get("skipped_rows", 0)) for v in raw.stats.get("sources", {}).values())
    if skipped:
        write_line(f"{skipped} bad rows skipped (--skip-bad-rows); per source: "
                   + ", ".join(f"{k}: {v.get('skipped_rows', 0)}" for k, v in raw.stats["sources"].items()))
    # Rows whose prompt alone reaches the length limit are dropped by tokenization: say how many,
    # and which limit (step 3 reports its own count, with its prompt limit).
    limit = (f"--max-prompt-seq-len {max_prompt_len}" if kind == "prompt"
             else f"--max-seq-len {max_seq_len}")
    long = {k: (stats[k].get("dropped_long_prompts", 0), stats[k].get("rows_in", 0)) for k in out}
    if kind != "prompt" and any(n for n, _ in long.values()):
        write_line(f"{long['train'][0]} of {long['train'][1]} training rows and {long['eval'][0]} of "
                   f"{long['eval'][1]} eval rows dropped: their prompt alone fills {limit} tokens")
    if len(out["train"]) == 0:
        n, rows_in = long["train"]
        if rows_in and n == rows_in:
            raise DataError(f"step {step_index} has no training rows: all {n} were dropped because "
                            f"their prompt is longer than {limit} tokens allow; raise {limit.split()[0]}")
        raise DataError(f"step {step_index} has no training rows after splitting "
                        f"{list(cfg.data_path)} with --data-split {cfg.data_split}; give this step "
                        "a larger share or more data")
    return out["train"], out["eval"], stats


def template_for(cfg, tokenizer) -> str:
    return resolve_template(cfg.template, tokenizer)


# ----------------------------------------------------------------------------- the loop

@dataclass
class LoopSpec:
    micro_batch: int
    grad_accum: int
    epochs: int
    max_steps: int
    eval_interval: int
    checkpoint_interval: int
    log_interval: int
    seed: int
    progress: bool

    def global_batch(self, world: int) -> int:
        return self.micro_batch * self.grad_accum * world


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    if n_rows < global_batch:
        raise DataError(f"the training set has {n_rows} rows, fewer than one global batch "
                        f"({global_batch} = micro-batch x accumulation x devices); lower the batch "
                        "size or add data")
    return n_rows // global_batch  # drop_last: every step sees a full global batch


def total_steps(n_rows: int, spec: LoopSpec, world: int) -> int:
    n = steps_per_epoch(n_rows, spec.global_batch(world)) * spec.epochs
    return min(n, spec.max_steps) if spec.max_steps > 0 else n


def epoch_batches(n_rows: int, seed: int, epoch: int, global_batch: int) -> list[list[int]]:
    """Row indices of each global batch of an epoch: seeded shuffle, full batches only."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    k = n_rows // global_batch
    return [order[i * global_batch:(i + 1) * global_batch] for i in range(k)]


def rank_micro_batches(global_rows: list[int], micro: int, accum: int, rank: int, world: int):
    """This rank's `accum` micro-batches of a global batch (interleaved so the split is fair)."""
    return [global_rows[(k * world + rank) * micro:(k * world + rank + 1) * micro] for k in range(accum)]


def supervised_loop(run: Run, engine, train_ds, spec: LoopSpec, *,
                    collate: Callable[[list[dict]], dict],
                    loss_fn: Callable[[object, dict], tuple[torch.Tensor, dict]],
                    units_fn: Callable[[dict], int],
                    evaluate: Callable[[], dict] | None = None,
                    unit_name: str = "tokens") -> dict:
    """Train `engine` on `train_ds`; returns the last eval metrics.

    loss_fn(engine, batch) -> (sum of losses over the batch's units, metric sums to log);
    units_fn(row) -> how many units a row contributes (label tokens, or 1 per pair).
    """
    world, rank = run.world, ds.rank()
    gb = spec.global_batch(world)
    per_epoch = steps_per_epoch(len(train_ds), gb)
    n_total = total_steps(len(train_ds), spec, world)
    step, epoch, start_in_epoch = 0, 0, 0

    # 1. resume
    if run.cfg.resume and (found := resume_checkpoint(run, {"model": engine})) is not None:
        last, state = found
        step, epoch, start_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        write_line(f"resumed from {last} at step {step} (epoch {epoch}, batch {start_in_epoch})")

    def probe() -> dict:
        """The loss of the last micro-batch at the current weights (eval mode: no dropout, no RNG)."""
        engine.eval()
        try:
            return {"loss": loss_fn(engine, batch)[0]}
        finally:
            engine.train()

    def checkpoint(nxt_epoch: int, nxt_batch: int) -> None:
        checkpoint_guard(run, f"step {step}", {"model": engine}, probe)
        ckpt.save_checkpoint(run.ckpt_dir, step, {"model": engine},
                             {"epoch": nxt_epoch, "batch_in_epoch": nxt_batch})

    bar = progress(n_total, f"{run.name} train", spec.progress, initial=step)
    last_eval: dict = {}
    t_units, t_tokens, t0 = 0, 0, time.time()
    flops_per_token = train_flops_per_token(engine.module)
    while step < n_total and epoch < spec.epochs:
        batches = epoch_batches(len(train_ds), spec.seed, epoch, gb)
        for b in range(start_in_epoch, per_epoch):
            if step >= n_total:
                break
            # 2. forward/backward over this rank's micro-batches, normalised by the global count
            rows_global = batches[b]
            n_units = sum(units_fn(train_ds[i]) for i in rows_global)
            loss_total = torch.zeros((), dtype=torch.float64)
            sums: dict[str, float] = {}
            for mb in rank_micro_batches(rows_global, spec.micro_batch, spec.grad_accum, rank, world):
                batch = collate([train_ds[i] for i in mb])
                loss_sum, extra = loss_fn(engine, batch)
                engine.backward(loss_sum / n_units * spec.grad_accum * world)
                engine.step()
                loss_total += loss_sum.detach().double().cpu()
                t_tokens += int(batch["attention_mask"].sum())
                for k, v in extra.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            step += 1
            t_units += n_units
            # 3. log
            reduced = ds.all_reduce_sum(torch.tensor([loss_total.item()] + list(sums.values()),
                                                     dtype=torch.float64))
            metrics = {"loss": reduced[0].item() / n_units}
            for i, k in enumerate(sums):
                metrics[k] = reduced[i + 1].item() / n_units
            metrics["lr"] = engine.get_lr()[0]
            metrics["epoch"] = epoch + (b + 1) / per_epoch
            guard_metrics(run, f"step {step}", metrics)
            if step % spec.log_interval == 0 or step == n_total:
                dt = time.time() - t0
                tokens = ds.all_reduce_sum(torch.tensor(float(t_tokens))).item()
                metrics[f"perf/{unit_name}_per_s"] = t_units / max(dt, 1e-9)
                metrics["perf/tokens_per_s"] = tokens / max(dt, 1e-9)
                metrics["perf/flops_per_s"] = flops_per_token * tokens / max(dt, 1e-9)
                run.logger.log(step, metrics)
                t_units, t_tokens, t0 = 0, 0, time.time()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            bar.update(1)
            # 4. evaluate / checkpoint
            if evaluate and spec.eval_interval and step % spec.eval_interval == 0:
                last_eval = evaluate()
                run.logger.log(step, last_eval, kind="eval")
            if spec.checkpoint_interval and step % spec.checkpoint_interval == 0 and step < n_total:
                checkpoint(*((epoch, b + 1) if b + 1 < per_epoch else (epoch + 1, 0)))
        epoch += 1
        start_in_epoch = 0
        if not spec.checkpoint_interval and step < n_total:
            checkpoint(epoch, 0)
        if evaluate and not spec.eval_interval and step < n_total:
            last_eval = evaluate()
            run.logger.log(step, last_eval, kind="eval")
    bar.close()
    if evaluate:
        last_eval = evaluate()
        guard_metrics(run, f"step {step} (final evaluation)", last_eval)
        run.logger.log(step, last_eval, kind="eval")
    guard_weights(run, f"step {step}", {"model": engine}, probe)  # before the caller saves the model
    return last_eval


def save_final(run: Run, engine, tokenizer, meta: dict) -> Path:
    """The step's model folder (atomic, LoRA merged) with the resolved config beside it."""
    final = run.out_dir / "model"
    extra = {"run_config.yaml": (run.out_dir / "run_config.yaml").read_text()} if ds.is_main() else None
    ckpt.save_model(engine.module, tokenizer, final, meta=meta, extra_files=extra)
    return final


def finish_run(run: Run) -> None:
    """After the final model is saved: drop the checkpoints (unless asked to keep them)."""
    import shutil

    if not run.cfg.keep_checkpoints and ds.is_main():
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)
    ds.barrier()
    run.logger.close()


def eval_batches(n_rows: int, batch: int, max_batches: int, rank: int, world: int) -> list[list[int]]:
    """This rank's evaluation batches: rows dealt round-robin, the same number on every rank (so
    ZeRO-3's collective forwards stay in lockstep; up to world-1 rows are left out)."""
    rows = list(range(n_rows - n_rows % world))[rank::world][:max_batches * batch]
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


def finite_or_raise(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise FloatingPointError(f"{what} became {x}; lower the learning rate or check the data")
    return x
