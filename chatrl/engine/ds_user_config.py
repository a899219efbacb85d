"""A user's DeepSpeed JSON config (`--deepspeed_config FILE`) merged into the one chatrl builds.

chatrl derives its engine config from its own flags (batch sizes, ZeRO stage, precision,
clipping, offload). A user's file adds what chatrl does not set (bucket sizes, ZeRO-3 prefetch
and persistence knobs, the flops profiler, comms logging...). Where both set a value, chatrl's
wins, so the training that chatrl's flags and run_config.yaml describe is the one that runs;
every such replacement is logged with the flag that controls it. Two sections are never taken
from the file: `optimizer` and `scheduler` (chatrl builds both from its flags and hands them to
DeepSpeed, which refuses a second definition), and "auto" values (a Hugging Face Trainer
convention that DeepSpeed itself cannot resolve).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Keys chatrl sets, and the flag that controls each (named in the log).
FLAG_OF = {
    "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "train_batch_size": "micro-batch x accumulation x devices",
    "gradient_clipping": "--max_grad_norm",
    "zero_optimization.stage": "--zero_stage",
    "zero_optimization.offload_optimizer": "--offload",
    "zero_optimization.offload_param": "--offload",
    "bf16.enabled": "--dtype",
    "fp16.enabled": "--dtype",
}
NEVER_TAKEN = {"optimizer": "chatrl builds AdamW from --learning_rate and --weight_decay",
               "scheduler": "chatrl builds it from --lr_scheduler_type and --num_warmup_steps"}


def read_deepspeed_config(path: str | Path) -> dict:
    """The JSON object in `path`, or a one-line ConfigError saying what is wrong with it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--deepspeed_config {path}: the file does not exist; pass a DeepSpeed "
                          "JSON config file (or drop the flag: chatrl builds the config from its flags)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON ({e}); fix the file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed_config {path} holds a JSON {type(data).__name__}; a DeepSpeed "
                          'config is an object such as {"zero_optimization": {"stage": 2}}')
    return data


def merge_deepspeed_config(ours: dict, theirs: dict) -> tuple[dict, list[str]]:
    """chatrl's engine config `ours` with the user's `theirs` merged in; returns (merged, notes).

    Nested sections merge key by key. notes: one line per key taken from the file, replaced by
    chatrl's value, or ignored.
    """
    notes: list[str] = []

    def merge(a: dict, b: dict, prefix: str) -> dict:
        out: dict[str, Any] = {}
        for k, v in b.items():
            key = prefix + k
            if not prefix and k in NEVER_TAKEN:
                notes.append(f"ignored {key} ({NEVER_TAKEN[k]})")
            elif v == "auto":
                notes.append(f"ignored {key}=\"auto\" (chatrl sets what it knows; DeepSpeed cannot "
                             "resolve \"auto\")")
            elif k not in a:
                out[k] = v
                notes.append(f"took {key}={json.dumps(v)}")
        for k, v in a.items():
            key = prefix + k
            if k in out or k not in b or b[k] == "auto":
                out.setdefault(k, v)
            elif isinstance(v, dict) and isinstance(b[k], dict):
                out[k] = merge(v, b[k], key + ".")
            else:
                out[k] = v
                if b[k] != v:
                    flag = FLAG_OF.get(key)
                    notes.append(f"kept chatrl's {key}={json.dumps(v)} over the file's "
                                 f"{json.dumps(b[k])}" + (f" (set by {flag})" if flag else ""))
        return out

    return merge(ours, theirs, ""), notes
