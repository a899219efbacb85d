"""One wrapper over DeepSpeed for every step: process group, ZeRO config, optimizer, scheduler.

The same code runs in-process for one device (the environment variables the launcher would set
are filled in) and under `deepspeed --num_gpus N` / `--hostfile` for many.
"""

from __future__ import annotations

import atexit
import functools
import glob
import itertools
import os
import socket
import sys
import time
import weakref
from dataclasses import dataclass

import torch

from ..errors import ConfigError


# ----------------------------------------------------------------------------- process group

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join (or create) the process group. Without a launcher this is a 1-rank group."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    # In-process: fill in what the launcher would set, or DeepSpeed tries MPI discovery.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores: more threads than cores makes every
        # OpenMP barrier wait on descheduled threads (measured 10x slower with 2 ranks x 2
        # threads on 2 cores).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if local > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ.get("LOCAL_RANK", "0") == "0":  # the other ranks wait on the lock rank 0 clears
        clear_stale_build_locks()  # a killed build of a JIT op (e.g. CPU Adam) would block every run
    if not torch.cuda.is_available():
        _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    atexit.register(_destroy_process_group)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif world_size() > 1:
        atexit.register(_remove_shm_buffer)


def _destroy_process_group() -> None:
    """At exit, while the interpreter is still whole: left to interpreter finalization, Gloo's
    worker threads can outlive it, and the process then aborts after its work is done
    ("terminate called without an active exception", SIGABRT), turning a run's exit status 2
    into -6 (seen once in a suite run, on `chatrl sft --resume` refusing unreadable checkpoints;
    pytorch/pytorch#190489)."""
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the group's own teardown still runs
        pass


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-builds (40-80 s on a fresh machine, with a C++ compiler) and
    loads a shared-memory all-reduce op when the process group starts. Only its tensor-parallel
    inference (`inference_all_reduce`) uses it; chatrl's collectives, ZeRO's included, go through
    torch.distributed (gloo). DeepSpeed skips ops its table marks incompatible: mark this one."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        table = getattr(deepspeed.ops, "__compatible_ops__", None)
        if builder is not None and isinstance(table, dict):
            table[builder.NAME] = False
    except Exception:  # another DeepSpeed layout: it builds the op as before
        pass


def _zero_check_without_muon() -> None:
    """DeepSpeed's ZeRO sanity check (`is_zero_supported_optimizer`) imports its Muon optimizer to
    put it on the supported list, and that import wraps Muon's kernels in torch.compile, which
    loads the inductor back end: about 1.3 s in every rank of every ZeRO run (bf16 runs use ZeRO-1
    too), measured on a 2-core EPYC. chatrl's optimizers (AdamW, DeepSpeedCPUAdam) are on the list
    already: answer for them without the import, and leave any other optimizer to DeepSpeed."""
    try:
        from deepspeed.runtime import engine as ds_engine
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError:  # another DeepSpeed layout: its check runs as before
        return
    original = getattr(ds_engine, "is_zero_supported_optimizer", None)
    listed = getattr(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", None)
    if original is None or listed is None or getattr(original, "chatrl_listed_first", False):
        return

    def is_zero_supported_optimizer(optimizer):
        return type(optimizer) in listed or original(optimizer)

    is_zero_supported_optimizer.chatrl_listed_first = True
    ds_engine.is_zero_supported_optimizer = is_zero_supported_optimizer


# A lock this old, with no process building in its folder, was left by a killed build.
STALE_LOCK_S = 120.0


def _extensions_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _building_in(folder: str) -> bool | None:
    """Whether a process works in `folder` (torch runs ninja there while it builds); None where
    /proc cannot tell."""
    if not os.path.isdir("/proc/self"):
        return None
    target = os.path.realpath(folder)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == target:
                return True
        except OSError:  # gone, or another user's
            continue
    return False


def clear_stale_build_locks(root: str | None = None, now: float | None = None) -> list[str]:
    """Remove the build locks of torch C++ extensions (DeepSpeed's JIT ops) that a killed build
    left behind, and say so on stderr. Returns the removed paths.

    torch takes `<extension folder>/lock` for every load of a JIT op, built or not, and a process
    that finds it waits for it to go away, silently and for ever: after one interrupted first
    run, every later chatrl command would hang at start with no CPU use. A lock counts as stale
    when it is older than STALE_LOCK_S and no process works in its folder (ninja runs there
    while a build is under way; without /proc, when it is over an hour old)."""
    root = root or _extensions_root()
    now = time.time() if now is None else now
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        try:
            age = now - os.path.getmtime(lock)
        except OSError:
            continue
        if age < STALE_LOCK_S:
            continue
        busy = _building_in(os.path.dirname(lock))  # a /proc scan: only for old locks
        if busy or (busy is None and age < 3600):
            continue
        try:
            os.unlink(lock)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"a stale build lock blocks DeepSpeed's op build: {lock} ({e.strerror}); "
                              "delete it, then run again") from None
        removed.append(lock)
        print(f"chatrl: removed a stale build lock left by an interrupted run ({age / 60:.0f} min "
              f"old, no build running): {lock}", file=sys.stderr, flush=True)
    return removed


def _remove_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce leaves each rank's 66 MB shared-memory buffer in /dev/shm (RAM)
    after the process ends; every multi-rank CPU run would leak 66 MB per rank until a reboot."""
    name = (f"deepspeed_allreduce_buffer_{getattr(os, 'getuid', lambda: 0)()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '')}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        home = x.device
        # NCCL reduces device tensors only; gloo (CPU) takes them as they are
        x = x.to(device()) if dist.get_backend() == "nccl" else x.clone()
        dist.all_reduce(x)
        x = x.to(home)
    return x


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 matmuls run
    several times faster than fp32 (measured 4x on a 2-core AVX512-BF16 machine). A CPU whose
    kernels are held to AVX2 (ATEN_CPU_CAPABILITY=avx2, as on an AVX2-only machine) emulates bf16."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(name: str) -> str:
    """'auto' -> bf16 on GPUs that support it, else fp32 (exact, the safe CPU default).
    'fast' -> bf16 wherever the hardware computes it natively (also AVX512-BF16/AMX CPUs), else
    fp32. fp16 needs a GPU (loss scaling)."""
    if name in ("auto", "fast") and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if name == "auto":
        return "fp32"
    if name == "fast":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if name == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--dtype fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling); on CPU use "
                          "--dtype bf16 or --dtype fp32")
    return name


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- engine

@dataclass(frozen=True)
class EngineSpec:
    """How one trained model is wrapped (derived from a step's config by the step)."""
    zero_stage: int = 0
    offload: bool = False
    dtype: str = "fp32"
    micro_batch: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    lora_lr: float = 5e-4
    scheduler: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1
    gradient_checkpointing: bool = False
    deepspeed_config: str | None = None  # a user's DeepSpeed JSON file, merged in (ds_user_config.py)


def ds_config(spec: EngineSpec, world: int) -> dict:
    stage = spec.zero_stage
    if spec.dtype == "bf16" and stage == 0:
        # DeepSpeed's bf16 at stage 0 updates the bf16 weights in place (no fp32 master copy), so
        # updates below bf16's resolution vanish (SFT perplexity 5.8 vs 3.9 in fp32 on the
        # default run). ZeRO-1 keeps fp32 master weights; on one rank it partitions nothing.
        stage = 1
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if spec.offload and spec.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if spec.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if spec.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                     "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch * spec.grad_accum * world,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.dtype == "bf16"},
        "fp16": {"enabled": spec.dtype == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        # On a host without CUDA the "offloaded" optimizer runs where everything else does: torch's
        # fused AdamW steps it as fast as DeepSpeedCPUAdam, whose JIT build costs ~80 s per machine.
        "zero_force_ds_cpu_optimizer": torch.cuda.is_available(),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _optimizer(groups: list[dict], spec: EngineSpec):
    if spec.offload and spec.zero_stage >= 1 and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=spec.lr, betas=(0.9, 0.95))
    # Fused AdamW on CPU too: 0.66 s -> 0.07 s per step for 135M parameters (benchmarks/).
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), fused=True)


def build_engine(model: torch.nn.Module, spec: EngineSpec):
    """Wrap a model for training: param groups (own LoRA lr), AdamW, warm-up + schedule, ZeRO."""
    import deepspeed
    from transformers import get_scheduler

    from ..models.lora import param_groups

    if spec.offload and spec.zero_stage == 0:
        raise ConfigError("--offload needs ZeRO: set --zero-stage 2 or 3 (or drop --offload)")
    if spec.gradient_checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    groups = param_groups(model, spec.lr, spec.weight_decay, spec.lora_lr)
    if not groups:
        raise ConfigError("the model has no trainable parameter (check --only-optimize-lora and "
                          "--lora-dim)")
    optimizer = _optimizer(groups, spec)

    def scheduler(opt):
        return get_scheduler(spec.scheduler, opt, num_warmup_steps=spec.warmup_steps,
                             num_training_steps=max(spec.total_steps, 1))

    config = ds_config(spec, world_size())
    if spec.deepspeed_config:
        config = _with_user_config(config, spec.deepspeed_config)
    _zero_check_without_muon()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config)
    track_engine(engine)
    # from_pretrained returns a model in eval mode and DeepSpeed leaves it so: without this the
    # dropout flags and gradient checkpointing (active only in training mode) did nothing.
    engine.train()
    return engine


# Every DeepSpeed engine this process built and has not released, by build order. Weak values: the
# registry keeps nothing alive; an engine leaked by a reference cycle is still found here.
_ENGINES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SERIAL = itertools.count()


def track_engine(engine):
    """Register an engine built by `deepspeed.initialize`, so the step that built it releases it."""
    _ENGINES[next(_SERIAL)] = engine
    return engine


def releases_engines(step):
    """Decorate a step function: the DeepSpeed engines it built are destroyed when it returns or
    raises. A ZeRO optimizer (bf16 at stage 0 too) registers gradient hooks on its parameters that
    point back at it; that cycle runs through autograd's C++ nodes, where the garbage collector does
    not look, so without `destroy()` the engine outlived the step with its model, gradients and
    optimizer state: `chatrl train` runs its steps in one process, and with bf16 its PPO step
    carried ~3 GB of the reward-model step."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        first = next(_SERIAL)
        try:
            return step(*args, **kwargs)
        finally:
            for serial in sorted((k for k in list(_ENGINES.keys()) if k > first), reverse=True):
                engine = _ENGINES.pop(serial, None)
                if engine is None:
                    continue
                try:
                    engine.destroy()
                except Exception as err:  # never hide the step's own result or error behind this
                    print(f"chatrl: releasing a DeepSpeed engine failed ({type(err).__name__}: {err});"
                          " its memory stays in use until the process exits", file=sys.stderr)

    return run


def _with_user_config(config: dict, path: str) -> dict:
    """`config` with the user's --deepspeed_config file merged in, each decision logged."""
    from ..logging import write_line
    from .ds_user_config import merge_deepspeed_config, read_deepspeed_config

    merged, notes = merge_deepspeed_config(config, read_deepspeed_config(path))
    for note in notes or ["nothing to add: the file sets only what chatrl sets, to the same values"]:
        write_line(f"--deepspeed_config {path}: {note}")
    return merged


def is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full on CPU (gathered one at a time under ZeRO-3).

    Collective under ZeRO-3: every rank must call it. Returns the dict on every rank.
    """
    import deepspeed

    out = {}
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
    done: dict[int, torch.Tensor] = {}  # tied weights stay one tensor (saved once)
    for name, tensor in model.state_dict(keep_vars=True).items():
        p = params.get(name, tensor)
        if id(p) in done:
            out[name] = done[id(p)]
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().clone().cpu()
        else:
            out[name] = tensor.detach().clone().cpu()
        done[id(p)] = out[name]
    return out
