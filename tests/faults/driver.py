"""`chatrl ARGS` with faults injected where a crash, a full disk or a diverging run would strike.

    CHATRL_FAULTS="kill_in_checkpoint=2,nan_from_step=3" python driver.py sft ...

Faults ($CHATRL_FAULTS, comma-separated):
  kill_at_step=S          SIGKILL as the train metrics row of step S is about to be written
  kill_in_checkpoint=S    SIGKILL inside the write of step S's checkpoint: the engine state is on
                          disk in the temporary folder, nothing is published yet
  kill_in_final_save=N    SIGKILL inside the N-th final model save (default 1; PPO saves the
                          critic, then the actor): every file is written into the temporary
                          folder, not yet renamed into place
  enospc_in_checkpoint=S  writing step S's checkpoint fails as on a full disk: torch.save writes
                          a few bytes, then raises OSError(ENOSPC) naming its file
  enospc_in_final_save    the final model save fails as on a full disk: the last file written
                          into the temporary folder raises OSError(ENOSPC)
  nan_from_step=S         from step (PPO: iteration) S on, every training-mode output of the
                          trained models' DeepSpeed engines is NaN, so the loss is not finite
                          (eval-mode forwards and generation, which uses the plain module, are not)

Everything else is the real CLI. SIGKILL gives no chance to clean up, like a crash or an OOM kill.
"""

import errno
import os
import signal
import sys
from pathlib import Path


def _faults() -> dict[str, int]:
    out = {}
    for item in filter(None, os.environ.get("CHATRL_FAULTS", "").split(",")):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value) if value else 1
    return out


FAULTS = _faults()


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def install() -> None:
    import torch

    import chatrl.engine.checkpoint as ckpt
    import chatrl.engine.ds as ds
    import chatrl.logging as L

    state = {"ckpt_step": None, "poisoned": FAULTS.get("nan_from_step", 0) == 1, "final_saves": 0}

    # --- metrics rows: kill_at_step, and arming nan_from_step after step S-1 is logged
    log = L.MetricsLogger.log

    def patched_log(self, step, metrics, kind="train"):
        if kind == "train" and step == FAULTS.get("kill_at_step"):
            _die()
        out = log(self, step, metrics, kind)
        if kind == "train" and step == FAULTS.get("nan_from_step", 0) - 1:
            state["poisoned"] = True
        return out

    L.MetricsLogger.log = patched_log

    # --- checkpoints: remember which step is being written
    save_checkpoint = ckpt.save_checkpoint

    def patched_save_checkpoint(root, step, *args, **kw):
        state["ckpt_step"] = step
        try:
            return save_checkpoint(root, step, *args, **kw)
        finally:
            state["ckpt_step"] = None

    ckpt.save_checkpoint = patched_save_checkpoint

    rng_state = ckpt._rng_state  # called after the engines' state is written, before publishing

    def patched_rng_state():
        if state["ckpt_step"] is not None and state["ckpt_step"] == FAULTS.get("kill_in_checkpoint"):
            _die()
        return rng_state()

    ckpt._rng_state = patched_rng_state

    torch_save = torch.save

    def patched_torch_save(obj, f, *args, **kw):
        if (state["ckpt_step"] is not None and state["ckpt_step"] == FAULTS.get("enospc_in_checkpoint")
                and isinstance(f, (str, os.PathLike))):
            Path(f).write_bytes(b"\0" * 1000)  # a partial file, as a full disk leaves
            raise _enospc(f)
        return torch_save(obj, f, *args, **kw)

    torch.save = patched_torch_save

    # --- the final model save (atomic_dir as used by checkpoint.save_model)
    atomic_dir = ckpt.atomic_dir

    class FaultyAtomicDir:
        def __init__(self, final):
            self.inner = atomic_dir(final)

        def __enter__(self):
            self.tmp = self.inner.__enter__()
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                state["final_saves"] += 1
                if state["final_saves"] == FAULTS.get("kill_in_final_save"):
                    _die()
                if "enospc_in_final_save" in FAULTS and state["final_saves"] == 1:
                    last = max((p for p in self.tmp.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
                    err = _enospc(last)
                    self.inner.__exit__(OSError, err, None)
                    raise err
            return self.inner.__exit__(exc_type, exc, tb)

    ckpt.atomic_dir = FaultyAtomicDir

    # --- non-finite outputs of the trained engines
    build_engine = ds.build_engine

    def poison(out):
        if isinstance(out, torch.Tensor):
            return out * float("nan")
        if hasattr(out, "logits"):
            out.logits = out.logits * float("nan")
        return out

    def patched_build_engine(model, spec):
        engine = build_engine(model, spec)
        forward = engine.forward

        def faulty_forward(*args, **kw):
            out = forward(*args, **kw)
            # training forwards only: step S-1's checks and evaluations (eval mode) stay clean
            return poison(out) if state["poisoned"] and engine.module.training else out

        engine.forward = faulty_forward
        return engine

    ds.build_engine = patched_build_engine


if __name__ == "__main__":
    install()
    from chatrl.cli import main

    sys.exit(main(sys.argv[1:]))
