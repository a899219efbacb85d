"""User reward functions with TRL's GRPO signature, loaded from a file or a module, and the
assembly of all reward sources of a run from its options."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .verifiers import BUILTIN_REWARDS, builtin_reward

__all__ = ["FunctionReward", "load_reward_function", "build_reward_sources"]


def load_reward_function(spec: str) -> Callable:
    """"path/to/file.py:name" or "package.module:name" -> the callable (ConfigError otherwise)."""
    if ":" not in spec:
        raise ConfigError(f"--reward-fn {spec!r} is neither a built-in reward "
                          f"({', '.join(BUILTIN_REWARDS)}) nor FILE.py:NAME / package.module:NAME")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or where.startswith("."):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"--reward-fn {spec!r}: the file {path} does not exist")
        mod_name = f"chatrl_reward_{abs(hash(str(path.resolve())))}"
        try:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - whatever the user's file raises on import
            raise ConfigError(f"--reward-fn {spec!r}: importing {path} failed with "
                              f"{type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--reward-fn {spec!r}: could not import module {where!r} "
                              f"({type(e).__name__}: {e})") from e
    fn = getattr(module, name, None)
    if fn is None:
        have = ", ".join(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"--reward-fn {spec!r}: {where} has no {name!r} (it defines: {have or 'nothing callable'})")
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


class FunctionReward:
    """fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float] (TRL's
    reward-function signature). A function without **kwargs gets only the arguments it names."""
    is_correctness = False
    per_sample_retry = True

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        params = inspect.signature(fn).parameters
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.named = set(params)

    def __call__(self, batch) -> list[float]:
        kwargs = {"prompts": batch.prompts, "completions": batch.completions,
                  "completion_ids": batch.completion_ids, **batch.columns}
        if not self.takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self.named}
        return self.fn(**kwargs)


def _unique(name: str, taken: set) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def build_reward_sources(reward_fns: list[str], *, reward_model=None,
                         reward_url: str | None = None, weights: list[float] | None = None,
                         answer_column: str = "answer", format_pattern: str | None = None,
                         timeout: float = 30.0, retries: int = 2) -> tuple[list, list[float]]:
    """(sources, weights) in the order: --reward-fn entries, the reward model, --reward-url.
    reward_model: a RewardModelSource (chatrl.rewards.model), or None."""
    from .remote import RemoteReward

    sources, taken = [], set()
    for spec in reward_fns:
        if spec in BUILTIN_REWARDS:
            sources.append(builtin_reward(spec, answer_column, format_pattern))
            taken.add(spec)
        else:
            fn = load_reward_function(spec)
            sources.append(FunctionReward(fn, _unique(getattr(fn, "__name__", "fn"), taken)))
    if reward_model is not None:
        reward_model.name = _unique(reward_model.name, taken)
        sources.append(reward_model)
    if reward_url:
        sources.append(RemoteReward(reward_url, _unique("remote", taken), timeout=timeout, retries=retries))
    if not sources:
        raise ConfigError("no reward: pass --reward-fn (a built-in like numeric or math, or "
                          "FILE.py:NAME), --reward-model-name-or-path or --reward-url")
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"--reward-weights has {len(weights)} value(s) for {len(sources)} reward "
                          f"source(s) ({', '.join(s.name for s in sources)}); give one per source, in "
                          "the order: --reward-fn entries, the reward model, --reward-url")
    return sources, [float(w) for w in weights]
