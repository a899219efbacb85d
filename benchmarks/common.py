"""What the benchmarks share: offline set-up, machine facts, the matmul peak, timing, tables, JSON.

Import this module before anything imports transformers / deepspeed (it sets the offline and
CPU-accelerator environment variables those libraries read at import time).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:   # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def quiet_libraries() -> None:
    """DeepSpeed and Transformers log a lot at INFO/WARNING; the benchmark prints its own table."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
    except Exception:  # pragma: no cover - deepspeed missing
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def host() -> str:
    return socket.gethostname().split(".")[0] or "host"


def machine_info() -> dict:
    """What a reader needs to compare two result files."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {
        "host": host(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cuda": torch.cuda.is_available(),
        "loadavg_at_start": load,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for mod in ("transformers", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """`with Timer() as t: ...; t.s` — wall seconds (CUDA synchronised at both ends)."""

    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.t0
        return False


class Probes:
    """Wall time spent inside chosen callables, without changing what they do: instance methods
    (engine.backward / engine.step) are shadowed by timed wrappers on that instance, module
    functions (hybrid._empty_cache) are swapped for the run and put back by `close()`."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._undo = []

    def _wrap(self, name, fn):
        def timed(*a, **kw):
            with Timer() as t:
                out = fn(*a, **kw)
            self.t[name] = self.t.get(name, 0.0) + t.s
            return out
        return timed

    def method(self, name, obj, attr):
        orig = getattr(obj, attr)
        object.__setattr__(obj, attr, self._wrap(name, orig))
        self._undo.append(lambda: object.__delattr__(obj, attr))

    def function(self, name, module, attr):
        orig = getattr(module, attr)
        setattr(module, attr, self._wrap(name, orig))
        self._undo.append(lambda: setattr(module, attr, orig))

    def take(self) -> dict:
        out, self.t = self.t, {}
        return out

    def close(self):
        for u in reversed(self._undo):
            u()
        self._undo = []


# ----------------------------------------------------------------------------- matmul peak

def matmul_peak(dtype: str, sizes=(1024, 2048), repeats: int = 5, min_time: float = 0.2) -> dict:
    """Best achieved FLOP/s of a square torch.matmul, FLOPs = 2 n^3 per product.

    For each size: one warm-up product, then `repeats` timed rounds, each of as many products as
    fill `min_time` seconds; the best round of the best size is the machine's peak.
    """
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = DTYPES[dtype]
    best, by_size = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        torch.matmul(a, b)   # warm-up (allocations, kernel choice)
        with Timer() as t:
            torch.matmul(a, b)
        k = max(1, int(min_time / max(t.s, 1e-6)))
        size_best = 0.0
        for _ in range(repeats):
            with Timer() as t:
                for _ in range(k):
                    torch.matmul(a, b)
            size_best = max(size_best, 2 * n ** 3 * k / t.s)
        by_size[n] = size_best
        best = max(best, size_best)
    return {"dtype": dtype, "flops": best, "by_size": by_size, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- prototypes
# Library changes measured before they are made: each patches chatrl in this process only and
# returns its undo. Used as `with prototypes("no-gc+fused-adamw"): ...`.

def _proto_no_gc():
    """HybridEngine ends every rollout with hybrid._empty_cache(); up to chatrl 8224e7c it always
    ran gc.collect(), which walks every Python object of the process (~0.3 s per rollout). Since
    then it collects only with release_inference_cache. Prototype: never collect, only empty the
    CUDA cache."""
    from chatrl.engine import hybrid

    orig = hybrid._empty_cache

    def empty_cache(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    hybrid._empty_cache = empty_cache
    return lambda: setattr(hybrid, "_empty_cache", orig)


def _proto_fused_adamw():
    """chatrl.engine.ds._optimizer uses AdamW(foreach=True) on CPU and fused=True only on CUDA;
    torch's fused AdamW has a CPU kernel too. Prototype: fused everywhere (engines built inside
    the block)."""
    from chatrl.engine import ds

    orig = ds._optimizer

    def optimizer(groups, spec):
        if spec.offload and spec.zero_stage >= 1:    # DeepSpeedCPUAdam: unchanged
            return orig(groups, spec)
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), fused=True)

    ds._optimizer = optimizer
    return lambda: setattr(ds, "_optimizer", orig)


PROTOTYPES = {"no-gc": _proto_no_gc, "fused-adamw": _proto_fused_adamw}


class prototypes:
    """`with prototypes("no-gc+fused-adamw"):` patches the library for the block, then restores.
    An empty spec patches nothing. Unknown names raise SystemExit."""

    def __init__(self, spec: str | None):
        self.names = [n for n in spec.split("+") if n] if spec else []
        for n in self.names:
            if n not in PROTOTYPES:
                raise SystemExit(f"unknown prototype {n!r}; known: {', '.join(PROTOTYPES)}")

    def __enter__(self):
        self.undo = [PROTOTYPES[n]() for n in self.names]
        return self

    def __exit__(self, *exc):
        for u in reversed(self.undo):
            u()
        return False


# ----------------------------------------------------------------------------- output

def fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}FLOP/s"
    return f"{x:.0f} FLOP/s"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: columns are (key, header); values already formatted or numbers."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths)))
            for b in body]
    return "\n".join(out)


def write_results(name: str, payload: dict, path: str | None = None) -> Path:
    """benchmarks/results/<name>-<host>.json (or `path`)."""
    out = Path(path) if path else RESULTS / f"{name}-{host()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out


def model_label(name: str | None) -> str:
    return name or "default (SmolLM2-135M-Instruct)"
