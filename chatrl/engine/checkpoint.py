"""Resumable checkpoints (weights, optimizer, scheduler, data position, RNG) and final model saves.

Layout under a step's output folder:

    checkpoints/step-000120/<engine name>/...   DeepSpeed state of each trained model (all ranks)
    checkpoints/step-000120/trainer_state.json  step, epoch, position in the data, controller state
    checkpoints/step-000120/rng-rank<r>.pt      RNG of each rank
    checkpoints/latest                          name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place only when every rank has
finished, then `latest` is replaced atomically: a crash at any moment leaves the previous good
checkpoint as `latest`. Final model folders are written the same way (see `save_model`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..models.load import atomic_dir, write_meta
from . import ds

LATEST = "latest"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, engines: dict, trainer_state: dict, keep: int = 2,
                    extra_objects: dict[str, object] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    extra_objects: `{file name: object}` written by rank 0 with torch.save *inside* the checkpoint
    before it is published (e.g. the actor's EMA weights), so `latest` never names a checkpoint
    that lacks them.
    """
    root = Path(root)
    name = f"step-{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if ds.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ds.barrier()
    for key, engine in engines.items():
        engine.save_checkpoint(str(tmp / key), tag="state", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng-rank{ds.rank()}.pt")
    ds.barrier()
    if ds.is_main():
        for fname, obj in (extra_objects or {}).items():
            torch.save(obj, tmp / fname)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, name)
        # Keep the newest `keep` checkpoints.
        old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    ds.barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def load_checkpoint(path: Path, engines: dict) -> dict:
    """Restore every engine, this rank's RNG, and return the trainer state."""
    for key, engine in engines.items():
        engine.load_checkpoint(str(path / key), tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    rng = path / f"rng-rank{ds.rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: dict,
               extra_files: dict[str, str] | None = None) -> Path | None:
    """Write a loadable Hugging Face folder (LoRA merged) atomically. Collective under ZeRO-3.

    `model` is the plain module (engine.module); a RewardModel saves its value head too.
    """
    from ..models.lora import has_lora, merged_state_dict

    out_dir = Path(out_dir)
    state = ds.full_state_dict(model)
    if has_lora(model):
        state = merged_state_dict(model, state)
    if ds.is_main():
        with atomic_dir(out_dir) as tmp:
            if hasattr(model, "v_head"):
                model.save_pretrained(tmp, state_dict=state, **meta)
            else:
                # A model with injected adapters: save the merged tensors under plain names.
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                write_meta(tmp, kind="causal_lm", **meta)
            tokenizer.save_pretrained(tmp)
            for fname, text in (extra_files or {}).items():
                (tmp / fname).write_text(text)
    ds.barrier()
    return out_dir
