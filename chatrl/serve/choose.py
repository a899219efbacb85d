"""Which model(s) `chatrl chat` and `chatrl serve` use, and under which names.

With no --path, the model is the newest one a `chatrl train` (or a single step) left in the
current folder's output/: the step-3 actor if there is one, else the newest DPO or SFT model;
with no output at all, the embedded default model. The caller prints `why`, so the user always
knows which model is answering.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ChatRLError

# The chat models a run leaves behind, best first (the reward model is not a chat model).
TRAINED = (("step3-models/*/actor", "the step-3 (PPO) actor"),
           ("dpo-models/*/model", "the DPO model"),
           ("actor-models/*/model", "the step-1 (SFT) model"))
# Folder names that say nothing about the model: name it by its parent too.
GENERIC = {"actor", "actor_ema", "model", "critic"}


def default_model_path(root: str | os.PathLike = "output") -> tuple[str, str]:
    """(path, why): the newest trained chat model under `root`, else the embedded default."""
    root = Path(root)
    for pattern, what in TRAINED:
        found = [p for p in root.glob(pattern) if (p / "config.json").is_file()]
        if found:
            newest = max(found, key=lambda p: (p / "config.json").stat().st_mtime)
            return str(newest), f"{what} of the latest `chatrl train` run here ({newest})"
    return "default", (f"the embedded default model (no trained model under {root}/; "
                       "pass --path to choose one)")


def display_name(path: str) -> str:
    """A short id for a model path: 'tiny', 'opt-1.3b', 'smollm2/actor' for .../smollm2/actor."""
    p = Path(os.path.normpath(str(path)))
    if p.name in GENERIC and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(path)


def unique_names(paths: list[str]) -> list[str]:
    """One distinct name per path: the display name, then -2, -3... for repeats."""
    names, seen = [], {}
    for path in paths:
        base = display_name(path)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


class ModelSet(dict):
    """The models served, {name: ChatModel}, in order; `.name` is the default (the first);
    `.names` maps each path as given to its model's name."""

    names: dict[str, str]

    @property
    def name(self) -> str:
        return next(iter(self))

    @property
    def template(self) -> str:
        return ", ".join(sorted({m.template for m in self.values()}))


def announce(text: str) -> None:
    """A status line on stderr (stdout stays the conversation / the server banner)."""
    print(text, file=sys.stderr, flush=True)


def load_models(paths: list[str] | None, model_name: str | None = None, *, dtype: str = "fp32",
                template: str = "auto", device: str | None = None) -> ModelSet:
    """Load each distinct path once (no paths: `default_model_path()`), saying what it loads."""
    from .generation import ChatModel

    if not paths:
        path, why = default_model_path()
        announce(f"No --path given: using {why}.")
        paths = [path]
    paths = list(dict.fromkeys(str(p) for p in paths))  # the same path twice is one model
    if model_name and len(paths) > 1:
        raise ChatRLError(f"--model-name {model_name!r} names one model, but {len(paths)} are served "
                          f"({', '.join(paths)}); leave it out: each model is named after its folder")
    names = [model_name] if model_name else unique_names(paths)
    models = ModelSet()
    models.names = dict(zip(paths, names))
    for name, path in zip(names, paths):
        announce(f"Loading model {path!r} ...")
        model = ChatModel.load(path, dtype=dtype, template=template, device=device)
        model.name = name
        models[name] = model
    return models
