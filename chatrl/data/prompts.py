"""Prompt data for online RL: prompts plus the other columns a reward needs (a reference answer,
test cases...), with a held-out split.

Sources (`--data-path`, several are concatenated):
- "arith": the built-in verifiable arithmetic task (chatrl/data/arith.py), its own test split;
- "openai/gsm8k": grade-school math; `answer` = the number after "####" (commas dropped),
  `solution` = the full worked answer; test split held out;
- "hendrycks/competition_math" (also "competition_math", "DigitalLearningGmbH/MATH-lighteval"):
  `problem` -> prompt, `answer` = the last \\boxed{} of `solution`, plus level and type;
- "<one of those names>:/path/file.jsonl": a local file in that dataset's schema (offline);
- a local .jsonl / .json / .parquet / .csv file, a folder of them, or a `save_to_disk` folder,
  with the prompt in `prompt` (text, or a list of chat messages), `messages` (the turns up to the
  last user turn are the prompt) or `question` / `problem`. Every other field is a column.

A text prompt reaches reward functions as a string and a chat prompt as its messages (TRL's two
forms). Without a test split, a seeded 9:1 split makes one. Rows whose prompt is missing, empty
or of the wrong type stop with an error naming the file and row (or are skipped and counted with
--skip-bad-rows); prompts longer than max_prompt_len tokens are dropped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .adapters import RowError, check_messages, checked_prompt
from .sources import DATA_SUFFIXES, EVAL_SPLIT_NAMES, _is_saved_dataset, _saved_splits, read_file_rows
from .templates import render_prompt, resolve_template

__all__ = ["PromptData", "PROMPT_ADAPTERS", "load_prompt_rows", "prompt_row", "tokenize_prompts"]

PROMPT_FIELDS = ("prompt", "messages", "question", "problem")


@dataclass
class PromptData:
    train: list[dict]
    eval: list[dict]
    stats: dict = field(default_factory=dict)


def _boxed(text: str) -> str | None:
    from ..rewards.verifiers import _boxed as boxed

    return boxed(text)


def prompt_row(row: dict, prompt_field: str | None = None) -> dict:
    """A raw row -> {"messages", "prompt", "conversational", "columns"} (RowError if unusable)."""
    if not isinstance(row, dict):
        raise RowError(None, f"should be an object but is {type(row).__name__}")
    key = prompt_field or next((k for k in PROMPT_FIELDS if row.get(k) is not None), None)
    if key is None:
        raise RowError(None, f"has no prompt: give it one of the fields {', '.join(PROMPT_FIELDS)}")
    value = row.get(key)
    if value is None:
        raise RowError(key, "is missing")
    columns = {k: v for k, v in row.items() if k != key}
    if isinstance(value, str):
        if not value.strip():
            raise RowError(key, "is empty")
        return {"messages": [{"role": "user", "content": value.strip()}], "prompt": value,
                "conversational": False, "columns": columns}
    turns = check_messages(value, key)
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    if last_user < 0:
        raise RowError(key, "has no user turn")
    prompt = checked_prompt(turns[:last_user + 1], key)
    return {"messages": prompt, "prompt": prompt, "conversational": True, "columns": columns}


def _gsm8k(row: dict) -> dict:
    out = prompt_row({"question": row.get("question")}, "question")
    answer = row.get("answer")
    if not isinstance(answer, str) or "####" not in answer:
        raise RowError("answer", "should be the worked solution ending in '#### N'")
    out["columns"] = {"answer": answer.rsplit("####", 1)[1].strip().replace(",", ""),
                      "solution": answer}
    return out


def _competition_math(row: dict) -> dict:
    out = prompt_row({"problem": row.get("problem")}, "problem")
    solution = row.get("solution")
    boxed = _boxed(solution) if isinstance(solution, str) else None
    if boxed is None:
        raise RowError("solution", "has no \\boxed{} answer")
    out["columns"] = {"answer": boxed.strip(), "solution": solution,
                      **{k: row[k] for k in ("level", "type") if k in row}}
    return out


# name -> (hub id, row adapter, held-out split names)
PROMPT_ADAPTERS = {
    "openai/gsm8k": ("openai/gsm8k", _gsm8k, ("test",), "main"),
    "hendrycks/competition_math": ("hendrycks/competition_math", _competition_math, ("test",), None),
    "competition_math": ("hendrycks/competition_math", _competition_math, ("test",), None),
    "DigitalLearningGmbH/MATH-lighteval": ("DigitalLearningGmbH/MATH-lighteval", _competition_math,
                                           ("test",), None),
}


def _adapt(rows, numbers, fn, where: str, skip_bad: bool, stats: dict) -> list[dict]:
    out = []
    numbers = numbers if numbers is not None else range(1, 1 << 62)
    for row, n in zip(rows, numbers):
        stats["rows_in"] = stats.get("rows_in", 0) + 1
        try:
            if isinstance(row, RowError):
                raise row
            out.append(fn(row))
        except RowError as e:
            if not skip_bad:
                raise DataError(" ".join(f"{where} row {n}: {e}; a prompt row needs one of "
                                         f"{', '.join(PROMPT_FIELDS)} (text or chat messages), or "
                                         "pass --skip-bad-rows to skip such rows".split())) from None
            stats["skipped_rows"] = stats.get("skipped_rows", 0) + 1
    return out


def _split(rows: list, seed: int, fraction: float = 0.1) -> tuple[list, list]:
    n = len(rows)
    n_eval = 0 if n < 2 else max(1, int(round(n * fraction)))
    perm = np.random.default_rng(seed).permutation(n).tolist()
    ev = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in ev], [r for i, r in enumerate(rows) if i in ev]


def _local_splits(path: Path) -> dict[str, tuple[Any, Any]]:
    if path.is_file():
        return read_file_rows(path)
    if path.is_dir() and _is_saved_dataset(path):
        return _saved_splits(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no data files ({', '.join(DATA_SUFFIXES)})")
        out: dict[str, tuple[list, list]] = {}
        for f in files:
            words = re.split(r"[^a-z0-9]+", f.name.lower())
            split = "test" if any(w in EVAL_SPLIT_NAMES for w in words) else "train"
            for _, (rows, nums) in read_file_rows(f).items():
                have = out.setdefault(split, ([], []))
                have[0].extend(rows)
                have[1].extend(nums)
        return out
    raise DataError(f"prompt data {path} does not exist; pass 'arith', openai/gsm8k, "
                    "hendrycks/competition_math or a local .jsonl/.json/.parquet/.csv file or folder")


def _hub_splits(hub: str, config: str | None) -> dict[str, tuple[Any, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(hub, config) if config else datasets.load_dataset(hub)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise DataError(f"could not load {hub} from the Hugging Face hub ({type(e).__name__}); "
                        f"without hub access pass a local copy: --data-path '{hub}:/path/rows.jsonl'") from e
    return {k: (iter(v), None) for k, v in loaded.items()}


def load_prompt_rows(spec: str, *, seed: int = 1234, skip_bad_rows: bool = False) -> PromptData:
    """One prompt source -> train / eval rows (see the module docstring)."""
    spec = spec.strip()
    if spec.lower() == "arith":
        from .arith import arith_rows

        train, test = arith_rows("train", 1000), arith_rows("test", 200)
        return PromptData(train, test, {"rows_in": 1200, "eval_from": "test split"})
    name, local = spec, None
    for known in PROMPT_ADAPTERS:
        if spec.lower().startswith(known.lower() + ":"):
            name, local = known, spec[len(known) + 1:]
    if name in PROMPT_ADAPTERS:
        hub, fn, eval_names, config = PROMPT_ADAPTERS[name]
        splits = _local_splits(Path(local).expanduser()) if local else _hub_splits(hub, config)
    else:
        fn, eval_names = prompt_row, EVAL_SPLIT_NAMES
        splits = _local_splits(Path(spec).expanduser())
    stats: dict = {}
    train, ev = [], []
    for split, (rows, numbers) in splits.items():
        where = f"{local or spec}" + (f" ({split} split)" if len(splits) > 1 else "")
        adapted = _adapt(rows, numbers, fn, where, skip_bad_rows, stats)
        (ev if split in eval_names or split in EVAL_SPLIT_NAMES else train).extend(adapted)
    if not train and not ev:
        raise DataError(f"{spec}: no usable prompt rows")
    if train and ev:
        stats["eval_from"] = "test split"
    else:
        train, ev = _split(train or ev, seed)
        stats["eval_from"] = "seeded 9:1 split"
    return PromptData(train, ev, stats)


def load_prompt_data(data_path: list[str], *, seed: int = 1234, skip_bad_rows: bool = False) -> PromptData:
    """Every source of `data_path`, concatenated (train rows shuffled with the seed)."""
    train, ev, stats = [], [], {}
    for spec in data_path:
        pd = load_prompt_rows(spec, seed=seed, skip_bad_rows=skip_bad_rows)
        train += pd.train
        ev += pd.eval
        stats[spec] = dict(pd.stats, train_rows=len(pd.train), eval_rows=len(pd.eval))
    perm = np.random.default_rng(seed).permutation(len(train)).tolist()
    return PromptData([train[i] for i in perm], ev, stats)


def tokenize_prompts(rows: list[dict], tokenizer, template: str, max_prompt_len: int) -> tuple[list[dict], int]:
    """Rows with `prompt_input_ids` added; prompts over max_prompt_len tokens dropped (counted)."""
    from .tokenize import _prompt_ids

    template = resolve_template(template, tokenizer)
    texts = [render_prompt(tokenizer, r["messages"], template) for r in rows]
    ids = _prompt_ids(tokenizer, texts, template) if texts else []
    out = [dict(r, prompt_input_ids=i) for r, i in zip(rows, ids) if len(i) <= max_prompt_len]
    return out, len(rows) - len(out)
