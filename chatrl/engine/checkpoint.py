"""Resumable checkpoints (weights, optimizer, scheduler, data position, RNG) and final model saves.

Layout under a step's output folder:

    checkpoints/step-000120/<engine name>/...   DeepSpeed state of each trained model (all ranks)
    checkpoints/step-000120/trainer_state.json  step, epoch, position in the data, controller state
    checkpoints/step-000120/rng-rank<r>.pt      RNG of each rank
    checkpoints/latest                          name of the newest complete checkpoint
    checkpoints/run.json                        this run's record: its resume settings and the
                                                checkpoints it wrote, oldest first

A checkpoint is written into a temporary folder and renamed into place only when every rank has
finished, then `latest` is replaced atomically: a crash at any moment leaves the previous good
checkpoint as `latest`. Final model folders are written the same way (see `save_model`).
Rotation deletes only checkpoints listed in the run's record, never another run's (a folder name
says nothing about which run wrote it). Resuming tries `latest`, then the older checkpoints newest
first, warning about each one that cannot be read. A write that fails for lack of space or
permission becomes one OutputError that names the file, the space needed and what to resume from.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError

from ..errors import ChatRLError, OutputError
from ..models.load import atomic_dir, write_meta
from . import ds

LATEST = "latest"
RECORD = "run.json"


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
    try:
        return _save_checkpoint(root, name, step, engines, trainer_state, keep, extra_objects)
    except (OSError, RuntimeError, SafetensorError) as e:
        tmp = root / f".tmp-{name}"
        needed = _tree_bytes(root / last) if (last := _latest_name(root)) else _engines_bytes(engines)
        failure = write_failure(e, f"checkpoint {name}", tmp if tmp.exists() else root, needed,
                                resume_hint(root))
        if ds.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise failure from e


def _save_checkpoint(root: Path, name: str, step: int, engines: dict, trainer_state: dict, keep: int,
                     extra_objects: dict | None) -> Path:
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
        # Keep this run's newest `keep` checkpoints; never touch one the record does not list.
        record = read_record(root) or {"settings": None, "written": []}
        written = [n for n in record["written"] if n != name] + [name]
        for old in written[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
        write_record(root, {**record, "written": written[-keep:]})
    ds.barrier()
    return final


def read_record(root: str | Path) -> dict | None:
    """The run's record in a checkpoints folder ({"settings", "written"}), or None."""
    try:
        record = json.loads((Path(root) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("written"), list) else None


def write_record(root: str | Path, record: dict) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    _write_text_atomic(Path(root) / RECORD, json.dumps(record, indent=1, default=str))


def ensure_record(root: str | Path, settings: dict) -> None:
    """Rank 0, before a checkpoint: make sure the run's record exists and holds its settings."""
    record = read_record(root)
    if record is None or record.get("settings") != settings:
        write_record(root, {"settings": settings, "written": (record or {}).get("written", [])})


def checkpoint_names(root: str | Path) -> list[str]:
    """Every complete-looking checkpoint folder (`step-*`), by name."""
    root = Path(root)
    return sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _latest_name(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return name if (root / name / "trainer_state.json").exists() else None


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


class UnreadableCheckpoint(Exception):
    """A checkpoint folder whose files cannot be read back (truncated, missing, not ours)."""


def load_checkpoint(path: Path, engines: dict) -> dict:
    """Restore every engine, this rank's RNG, and return the trainer state.

    Raises UnreadableCheckpoint when a file is missing or cannot be read back."""
    import pickle

    try:
        state = json.loads((path / "trainer_state.json").read_text())
        for key, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(path / key), tag="state", load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise UnreadableCheckpoint(f"no {key} state in it")
        rng = path / f"rng-rank{ds.rank()}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise UnreadableCheckpoint(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    return state


def resume_candidates(root: str | Path) -> list[Path]:
    """Checkpoints to resume from, best first: `latest`, then the run's record newest first, then
    any other `step-*` folder, newest name first."""
    root = Path(root)
    names = []
    try:
        names.append((root / LATEST).read_text().strip())
    except OSError:
        pass
    names += reversed((read_record(root) or {}).get("written", []))
    names += reversed(checkpoint_names(root))
    seen, out = set(), []
    for n in names:
        if n and n not in seen and (root / n).is_dir():
            seen.add(n)
            out.append(root / n)
    return out


def load_latest(root: str | Path, engines: dict, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """Load the newest readable checkpoint (collective); None if there is none at all.

    An unreadable one is reported through `warn` and the next older one is tried, so a corrupt
    `latest` costs the steps since the previous checkpoint, never the whole run; once one loads,
    the unreadable newer ones are removed. Raises OutputError (removing nothing) when checkpoints
    exist but none can be read.
    """
    root = Path(root)
    candidates = resume_candidates(root)
    problems = []
    for i, path in enumerate(candidates):
        try:
            state, why = load_checkpoint(path, engines), None
        except UnreadableCheckpoint as e:
            state, why = None, str(e)
        # every rank must take the same checkpoint
        if ds.all_reduce_sum(torch.tensor([0.0 if why is None else 1.0])).item() == 0:
            if problems and ds.is_main():
                for bad in candidates[:i]:
                    shutil.rmtree(bad, ignore_errors=True)
                record = read_record(root)
                if record is not None:
                    written = record["written"]
                    kept = written[:written.index(path.name) + 1] if path.name in written else [path.name]
                    write_record(root, {**record, "written": kept})
                _write_text_atomic(root / LATEST, path.name)
            ds.barrier()
            return path, state
        why = why or "unreadable on another rank"
        problems.append(f"{path.name}: {why}")
        nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
        warn(f"warning: checkpoint {path.name} in {root} cannot be read ({why}); "
             + (f"falling back to {nxt}" if nxt else "no older checkpoint is left"))
    if problems:
        raise OutputError(f"--resume: no checkpoint in {root} can be read ({'; '.join(problems)}); "
                          "pass --overwrite instead of --resume to start the step afresh")
    return None


def resume_hint(root: str | Path) -> str:
    """What --resume would continue from, as the end of an error message ("..., then <hint>")."""
    name = _latest_name(Path(root))
    if name:
        return f"re-run with --resume to continue from the last checkpoint, {name} (intact)"
    return "re-run with --resume (there is no checkpoint yet, so it starts the step from the beginning)"


# ----------------------------------------------------------------------------- write failures

_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _engines_bytes(engines: dict) -> int:
    """About a checkpoint's size: weights plus Adam's two moments."""
    return 3 * sum(p.numel() * p.element_size() for e in engines.values() for p in e.module.parameters())


def _newest_file(folder: Path) -> Path | None:
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).exists() else []
    # the last one written; among equal (coarse) timestamps the biggest, a partly written weights file
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.stat().st_size)) if files else None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def write_failure(e: BaseException, what: str, folder: Path, needed: int, hint: str,
                  where: Path | None = None) -> ChatRLError | None:
    """The one-line error for a failed write into `folder`, or None if it is not a space or
    permission problem (a bug: the caller re-raises it with its traceback).

    Libraries report a full disk differently: Python raises OSError(ENOSPC), torch's writer a
    RuntimeError without an errno, safetensors its own error. Those are taken for a full disk
    when the filesystem indeed lacks the space the write needs.
    """
    code = getattr(e, "errno", None)
    where = getattr(e, "filename", None) or where or _newest_file(folder) or folder
    free = _free_bytes(Path(folder))
    if code in _DENIED:
        return OutputError(f"cannot write {what} to {where}: {os.strerror(code)}; make "
                           f"{Path(folder).parent} writable, then {hint}")
    full = code in _FULL or (code is None and free is not None and free < needed)
    if not full:
        return None
    space = f"{_mb(free)} free there" if free is not None else "free space unknown"
    return OutputError(f"no space left on device while writing {what} at {where} (it needs about "
                       f"{_mb(needed)}, {space}); free some space, then {hint}")


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: dict,
               extra_files: dict[str, str] | None = None, state: dict | None = None) -> Path | None:
    """Write a loadable Hugging Face folder (LoRA merged) atomically. Collective under ZeRO-3.

    `model` is the plain module (engine.module); a RewardModel saves its value head too. `state`:
    other full weights in the module's layout to save in its place (the actor's EMA); without it
    the module's own. A full disk or a denied write is a one-line error naming the folder.
    """
    from ..models.lora import has_lora, merged_state_dict

    out_dir = Path(out_dir)
    state = ds.full_state_dict(model) if state is None else state
    if has_lora(model):
        state = merged_state_dict(model, state)
    if ds.is_main():
        where = None
        try:
            with atomic_dir(out_dir) as tmp:
                try:
                    _write_model(model, tokenizer, tmp, state, meta, extra_files)
                except BaseException:
                    where = _newest_file(tmp)  # the file being written (tmp is removed on exit)
                    raise
        except (OSError, RuntimeError, SafetensorError) as e:
            needed = sum(v.numel() * v.element_size() for v in state.values())
            failure = write_failure(e, f"the final model {out_dir}", out_dir.parent, needed,
                                    resume_hint(out_dir.parent / "checkpoints"), where)
            if failure is None:
                raise
            raise failure from e
    ds.barrier()
    return out_dir


def _write_model(model, tokenizer, tmp: Path, state: dict, meta: dict, extra_files) -> None:
    if hasattr(model, "v_head"):
        model.save_pretrained(tmp, state_dict=state, **meta)
    else:
        # A model with injected adapters: save the merged tensors under plain names.
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        write_meta(tmp, kind="causal_lm", **meta)
    tokenizer.save_pretrained(tmp)
    for fname, text in (extra_files or {}).items():
        (tmp / fname).write_text(text)
