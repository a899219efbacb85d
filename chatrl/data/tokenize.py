"""Unified rows -> token ids for one step, without padding, cached on disk.

Step kinds (the `step` argument takes either spelling):
    1 or "sft"     input_ids = prompt + response + [eos], prompt_len
    2 or "rm"      chosen_input_ids, rejected_input_ids (each prompt + response + [eos]), prompt_len
    3 or "prompt"  prompt_input_ids (and `messages`, kept so reports and judges can read the
                   prompt); prompts longer than max_prompt_len are dropped and counted

The prompt is the conversation rendered by templates.render_prompt and tokenized with the
tokenizer's normal special-token handling (except that a chat template which already writes the
BOS token does not get a second one); the response is render_response's text tokenized with
add_special_tokens=False; the EOS is appended as an id. Sequences longer than max_seq_len are cut
on the right (counted in "truncated"); rows whose prompt alone fills max_seq_len are dropped
(counted in "dropped_long_prompts", as are step 3's prompts over max_prompt_len).

Rows are stored as they are, never padded (collate.py pads each batch to its own longest row).
The result is saved with save_to_disk under cache_root/<kind>-<hash>, the hash covering
everything that changes the output: the rows (their fingerprint, or cache_key_parts), the step
kind, the tokenizer (name, a hash of its full definition, eos/pad ids, chat template), the
template, both max lengths and FORMAT_VERSION. The same inputs load from disk; any change misses.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from datasets import Dataset, Features, List, Value, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from ..errors import ConfigError
from ..models.load import atomic_dir, cache_dir
from .templates import render_prompt, render_response, resolve_template

FORMAT_VERSION = 1
STEP_KINDS = {1: "sft", 2: "rm", 3: "prompt", "sft": "sft", "rm": "rm", "prompt": "prompt"}
_BATCH = 1000
_IDS = List(Value("int32"))
_MESSAGES = List({"role": Value("string"), "content": Value("string")})


def step_kind(step: int | str) -> str:
    """1/"sft", 2/"rm", 3/"prompt" -> "sft" | "rm" | "prompt"."""
    try:
        return STEP_KINDS[step]
    except (KeyError, TypeError):
        raise ConfigError(f"step {step!r} has no tokenized form; use 1 or 'sft', 2 or 'rm', "
                          "3 or 'prompt'") from None


def tokenizer_key(tokenizer) -> dict:
    """What identifies a tokenizer's output: name, a hash of its definition, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()  # vocab, merges, normalizer, pre/post-processors
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    definition += json.dumps([str(t) for t in tokenizer.all_special_tokens])
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "definition": hashlib.sha256(definition.encode()).hexdigest(),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def cache_key(ds: Dataset, tokenizer, kind: str, template: str, max_seq_len: int,
              max_prompt_len: int, cache_key_parts: dict | None) -> str:
    rows = cache_key_parts if cache_key_parts is not None else {"fingerprint": ds._fingerprint,
                                                                "n": len(ds)}
    parts = {"format": FORMAT_VERSION, "rows": rows, "kind": kind, "template": template,
             "tokenizer": tokenizer_key(tokenizer), "max_seq_len": max_seq_len,
             "max_prompt_len": max_prompt_len}
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _prompt_ids(tokenizer, texts: list[str], template: str) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token", None)
    if template == "chat" and bos and all(t.startswith(bos) for t in texts):
        # The chat template already wrote the BOS; adding special tokens would double it.
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(texts)["input_ids"]


def _response_ids(tokenizer, texts: list[str], template: str) -> list[list[int]]:
    return tokenizer([render_response(t, template) for t in texts],
                     add_special_tokens=False)["input_ids"]


def _tokenize_rows(ds: Dataset, tokenizer, kind: str, template: str, max_seq_len: int,
                   max_prompt_len: int) -> tuple[dict[str, list], dict]:
    eos = tokenizer.eos_token_id
    cols: dict[str, list] = {"sft": {"input_ids": [], "prompt_len": []},
                             "rm": {"chosen_input_ids": [], "rejected_input_ids": [], "prompt_len": []},
                             "prompt": {"prompt_input_ids": [], "messages": []}}[kind]
    stats = {"rows_in": len(ds), "dropped_long_prompts": 0, "dropped_no_rejected": 0,
             "truncated": 0}
    for batch in ds.iter(batch_size=_BATCH):
        prompts = _prompt_ids(tokenizer, [render_prompt(tokenizer, m, template)
                                          for m in batch["messages"]], template)
        if kind == "prompt":
            for ids, messages in zip(prompts, batch["messages"]):
                if len(ids) > max_prompt_len:
                    stats["dropped_long_prompts"] += 1
                    continue
                cols["prompt_input_ids"].append(ids)
                cols["messages"].append(messages)
            continue
        chosen = _response_ids(tokenizer, batch["chosen"], template)
        if kind == "sft":
            for p, r in zip(prompts, chosen):
                if len(p) >= max_seq_len:
                    stats["dropped_long_prompts"] += 1
                    continue
                ids = p + r + [eos]
                stats["truncated"] += len(ids) > max_seq_len
                cols["input_ids"].append(ids[:max_seq_len])
                cols["prompt_len"].append(len(p))
            continue
        has_rejected = [r is not None for r in batch["rejected"]]
        rejected = iter(_response_ids(tokenizer, [r for r in batch["rejected"] if r is not None],
                                      template))
        for p, c, ok in zip(prompts, chosen, has_rejected):
            r = next(rejected) if ok else None
            if r is None:
                stats["dropped_no_rejected"] += 1
                continue
            if len(p) >= max_seq_len:
                stats["dropped_long_prompts"] += 1
                continue
            c_ids, r_ids = p + c + [eos], p + r + [eos]
            stats["truncated"] += len(c_ids) > max_seq_len or len(r_ids) > max_seq_len
            cols["chosen_input_ids"].append(c_ids[:max_seq_len])
            cols["rejected_input_ids"].append(r_ids[:max_seq_len])
            cols["prompt_len"].append(len(p))
    return cols, stats


def _features(kind: str) -> Features:
    if kind == "sft":
        return Features({"input_ids": _IDS, "prompt_len": Value("int32")})
    if kind == "rm":
        return Features({"chosen_input_ids": _IDS, "rejected_input_ids": _IDS,
                         "prompt_len": Value("int32")})
    return Features({"prompt_input_ids": _IDS, "messages": _MESSAGES})


def tokenize_step_data(ds: Dataset, tokenizer, *, step: int | str, template: str,
                       max_seq_len: int = 512, max_prompt_len: int = 256,
                       cache_key_parts: dict | None = None,
                       cache_root: Path | None = None) -> tuple[Dataset, dict]:
    """Tokenize unified rows for a step (see the module docstring); returns (dataset, stats).

    stats: rows_in, rows_out, dropped_long_prompts, dropped_no_rejected, truncated, tokens,
    cache ("hit" | "miss") and cache_path.
    """
    kind = step_kind(step)
    if max_seq_len < 2 or max_prompt_len < 1:
        raise ConfigError(f"--max-seq-len {max_seq_len} / --max-prompt-len {max_prompt_len} are too "
                          "small; use e.g. --max-seq-len 512 --max-prompt-len 256")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path} has no EOS token to end responses; "
                          "set eos_token in its tokenizer_config.json")
    template = resolve_template(template, tokenizer)
    root = Path(cache_root) if cache_root is not None else cache_dir() / "data"
    key = cache_key(ds, tokenizer, kind, template, max_seq_len, max_prompt_len, cache_key_parts)
    folder = root / f"{kind}-{key}"
    stats_file = folder / "chatrl_stats.json"
    if stats_file.exists():
        stats = json.loads(stats_file.read_text())
        return _load(folder, kind, stats), dict(stats, cache="hit", cache_path=str(folder))

    cols, stats = _tokenize_rows(ds, tokenizer, kind, template, max_seq_len, max_prompt_len)
    out = Dataset.from_dict(cols, features=_features(kind))
    stats["rows_out"] = len(out)
    ids_cols = [c for c in cols if c.endswith("input_ids")]
    stats["tokens"] = int(sum(len(x) for c in ids_cols for x in cols[c]))
    with atomic_dir(folder) as tmp, _quiet():
        if len(out):  # `datasets` cannot load back a saved dataset of 0 rows
            out.save_to_disk(str(tmp))
        (tmp / "chatrl_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return _load(folder, kind, stats), dict(stats, cache="miss", cache_path=str(folder))


def _load(folder: Path, kind: str, stats: dict) -> Dataset:
    """The cached rows, memory-mapped from disk (so big corpora need not fit in RAM)."""
    if not stats.get("rows_out"):
        return Dataset.from_dict({k: [] for k in _features(kind)}, features=_features(kind))
    return load_from_disk(str(folder))


@contextmanager
def _quiet():
    """No `datasets` progress bars for our internal saves (the caller reports progress)."""
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()

