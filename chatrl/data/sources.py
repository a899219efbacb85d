"""Load any data source into the unified schema: named datasets, local files, folders, the demo.

`load_source(spec)` accepts:
- a named dataset of DATASETS.md ("Dahoas/rm-static", "mkqa-Chinese", ...): downloaded through
  `datasets.load_dataset` (real users have the hub; offline it raises DataError);
- "<name>:<local path>": a local file or folder written in that named dataset's schema, read
  with the dataset's adapter (how the tests cover every adapter offline);
- "demo": the built-in demo preference task (chatrl/data/demo.py);
- "local/jsonfile": DeepSpeed-Chat's local dataset, data/train.json and data/eval.json under the
  current folder (prompt/chosen/rejected rows; its prompts hold the "Human: ... Assistant:" turns);
- "arith": the built-in verifiable arithmetic task (chatrl/data/arith.py) as SFT data;
- a local .json / .jsonl / .parquet / .csv file with prompt + chosen (or response) + optional
  rejected columns, or chat-style `messages`;
- a folder written by `datasets.save_to_disk` (a Dataset or a DatasetDict);
- a folder of such data files (file names containing test/valid/dev/eval are the eval split).

Row numbers in errors are the ones the user sees in the file: the line number for JSONL and CSV
(a CSV header is line 1, as a spreadsheet shows it), the 1-based position for a JSON array,
Parquet and saved datasets.

A source without an eval split gets a seeded 9:1 train/eval split.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value

from ..errors import DataError
from .adapters import ADAPTERS, LOCAL, Adapter, RowError, adapt_rows, find_adapter

FEATURES = Features({
    "messages": List({"role": Value("string"), "content": Value("string")}),
    "chosen": Value("string"),
    "rejected": Value("string"),
})
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "dev", "eval")
EVAL_FRACTION = 0.1


@dataclass
class SourceData:
    """One source in the unified schema.

    pairwise: the source has rejected answers (a named pairwise dataset, or a local source where
    at least one row has one); rows without a rejected answer are skipped by step 2.
    stats: rows_in, rows_kept, skipped_rows (bad rows skipped), filtered_rows (rows the dataset
    marks as holding no example), train_rows, eval_rows, eval_from.
    """

    name: str
    train: Dataset
    eval: Dataset
    pairwise: bool
    stats: dict = field(default_factory=dict)


def rows_to_dataset(rows: list[dict]) -> Dataset:
    """Unified rows -> a Dataset with the fixed schema (so sources concatenate)."""
    if not rows:
        return Dataset.from_dict({"messages": [], "chosen": [], "rejected": []}, features=FEATURES)
    return Dataset.from_list(rows, features=FEATURES)


def train_eval_split(ds: Dataset, seed: int, eval_fraction: float = EVAL_FRACTION
                     ) -> tuple[Dataset, Dataset]:
    """A seeded split: shuffle the rows, the first `eval_fraction` (at least 1 row when there
    are 2 or more) is eval, the rest train, each kept in file order."""
    n = len(ds)
    n_eval = 0 if n < 2 else max(1, int(round(n * eval_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = sorted(perm[:n_eval].tolist()), sorted(perm[n_eval:].tolist())
    return ds.select(train_idx), ds.select(eval_idx)


# ---------------------------------------------------------------------------------------------
# Reading raw rows from files, with the row numbers users see


def _json_error(e: json.JSONDecodeError) -> RowError:
    return RowError(None, f"is not valid JSON ({e.msg} at column {e.colno})")


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    rows, numbers = [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(_json_error(e))
            numbers.append(line_no)
    return rows, numbers


def _read_json(path: Path) -> dict[str, tuple[list[Any], list[int]]]:
    """A JSON array of rows, an object of split name -> array, or {"data": [...]}; JSON lines too."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # A .json file holding JSON lines (common, and what `datasets` accepts).
        return {"train": _read_jsonl(path)}
    if isinstance(data, list):
        return {"train": (data, list(range(1, len(data) + 1)))}
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        splits = {k: v for k, v in lists.items() if k in ("train", *EVAL_SPLIT_NAMES)}
        if splits:
            return {k: (v, list(range(1, len(v) + 1))) for k, v in splits.items()}
        if len(lists) == 1:
            rows = next(iter(lists.values()))
            return {"train": (rows, list(range(1, len(rows) + 1)))}
    raise DataError(f"{path}: the JSON holds a {type(data).__name__} that is not a list of rows; "
                    "write a JSON array of objects like [{\"prompt\": ..., \"chosen\": ...}], "
                    "one object per line (.jsonl), or {\"train\": [...], \"test\": [...]}")


def _read_csv(path: Path) -> tuple[list[Any], list[int]]:
    rows, numbers = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return [], []
        start = reader.line_num + 1
        for values in reader:
            if any(v.strip() for v in values):
                # An empty cell is a missing value (CSV cannot tell "" from nothing).
                rows.append({k: (v if v != "" else None) for k, v in zip(header, values)})
                numbers.append(start)
            start = reader.line_num + 1
    return rows, numbers


def _read_parquet(path: Path) -> tuple[list[Any], list[int]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: could not read it as Parquet ({e}); check that the file is a "
                        "complete Parquet file") from e
    return rows, list(range(1, len(rows) + 1))


def read_file_rows(path: Path) -> dict[str, tuple[list[Any], list[int]]]:
    """Raw rows of one data file per split: {split: (rows, row numbers)}.

    A row that cannot be parsed (a bad JSON line) is returned as a RowError in its place.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return {"train": _read_jsonl(path)}
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return {"train": _read_csv(path)}
        if suffix == ".parquet":
            return {"train": _read_parquet(path)}
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: is not UTF-8 text ({e}); save it as UTF-8") from e
    raise DataError(f"{path}: unknown data file type {suffix!r}; use one of "
                    f"{', '.join(DATA_SUFFIXES)}, or a folder written by datasets.save_to_disk")


def _split_of(file: Path) -> str:
    words = re.split(r"[^a-z0-9]+", file.name.lower())
    return "eval" if any(w in EVAL_SPLIT_NAMES for w in words) else "train"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def _iter_dataset(ds: Dataset) -> Iterator[dict]:
    yield from ds


def _saved_splits(folder: Path) -> dict[str, tuple[Any, Any]]:
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: could not load it as a saved dataset ({e}); pass a folder "
                        "written by datasets' save_to_disk") from e
    if isinstance(loaded, DatasetDict):
        return {k: (_iter_dataset(v), None) for k, v in loaded.items()}
    return {"train": (_iter_dataset(loaded), None)}


# ---------------------------------------------------------------------------------------------
# Sources


def _adapt_splits(splits: dict[str, tuple[Any, Any]], adapter: Adapter, label: str,
                  skip_bad_rows: bool, name_split: bool) -> tuple[dict[str, list[dict]], dict]:
    """Adapt every split's rows; returns ({split: unified rows}, stats)."""
    stats: dict = {}
    out: dict[str, list[dict]] = {}
    for split, (rows, numbers) in splits.items():
        where = f"{label} ({split} split)" if name_split else label
        out[split] = adapt_rows(adapter.name, rows, source=where, skip_bad_rows=skip_bad_rows,
                                stats=stats, numbers=numbers)
    return out, stats


def _assemble(name: str, split_rows: dict[str, list[dict]], stats: dict, adapter: Adapter,
              seed: int) -> SourceData:
    eval_names = set(adapter.eval_splits) | set(EVAL_SPLIT_NAMES)
    train_rows = [r for k, rows in split_rows.items() if k not in eval_names for r in rows]
    eval_rows = [r for k, rows in split_rows.items() if k in eval_names for r in rows]
    if not train_rows and not eval_rows:
        raise DataError(f"{name}: no usable rows (read {stats.get('rows_in', 0)}, skipped "
                        f"{stats.get('skipped_rows', 0)} bad, {stats.get('filtered_rows', 0)} "
                        "without an example); check the file's columns: rows need "
                        f"{adapter.fields}")
    if eval_rows and train_rows:
        train, eval_ = rows_to_dataset(train_rows), rows_to_dataset(eval_rows)
        stats["eval_from"] = "eval split"
    else:
        train, eval_ = train_eval_split(rows_to_dataset(train_rows or eval_rows), seed)
        stats["eval_from"] = "seeded 9:1 split"  # EVAL_FRACTION
    all_rows = train_rows + eval_rows
    pairwise = adapter.pairwise if adapter is not LOCAL else any(r["rejected"] is not None
                                                                  for r in all_rows)
    stats.update(train_rows=len(train), eval_rows=len(eval_))
    return SourceData(name=name, train=train, eval=eval_, pairwise=pairwise, stats=stats)


def _load_local(path: Path, adapter: Adapter, name: str, seed: int, skip_bad_rows: bool) -> SourceData:
    if path.is_file():
        splits = read_file_rows(path)
        split_rows, stats = _adapt_splits(splits, adapter, str(path), skip_bad_rows,
                                          name_split=len(splits) > 1)
    elif path.is_dir() and _is_saved_dataset(path):
        splits = _saved_splits(path)
        split_rows, stats = _adapt_splits(splits, adapter, str(path), skip_bad_rows, name_split=True)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no data files ({', '.join(DATA_SUFFIXES)}) and "
                            "was not written by datasets.save_to_disk; pass a file or a folder of them")
        split_rows, stats = {"train": [], "eval": []}, {}
        for file in files:
            for split, (rows, numbers) in read_file_rows(file).items():
                target = "eval" if split in EVAL_SPLIT_NAMES or _split_of(file) == "eval" else "train"
                split_rows[target].extend(adapt_rows(adapter.name, rows, source=str(file),
                                                     skip_bad_rows=skip_bad_rows, stats=stats,
                                                     numbers=numbers))
    else:
        raise DataError(f"data path {path} does not exist; pass a named dataset "
                        f"({', '.join(list(ADAPTERS)[:3])}, ...), 'demo', or an existing "
                        ".json/.jsonl/.parquet/.csv file or folder")
    stats["origin"] = str(path)
    return _assemble(name, split_rows, stats, adapter, seed)


def _load_hub(adapter: Adapter, seed: int, skip_bad_rows: bool) -> SourceData:
    import datasets

    try:
        loaded = datasets.load_dataset(adapter.hub_name, adapter.hub_config)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        # OSError covers ConnectionError (offline / unreachable) and DatasetNotFoundError.
        raise DataError(
            f"could not load dataset {adapter.name!r} from the Hugging Face hub "
            f"({type(e).__name__}: {' '.join(str(e).split())}); without hub access, download it "
            f"elsewhere and pass a local file instead, e.g. --data-path "
            f"'{adapter.name}:/path/to/rows.jsonl' (a file in that dataset's schema) or a "
            "prompt/chosen/rejected .jsonl") from e
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    splits = {k: (_iter_dataset(v), None) for k, v in loaded.items()
              if k == "train" or k in adapter.eval_splits}
    split_rows, stats = _adapt_splits(splits, adapter, adapter.name, skip_bad_rows, name_split=True)
    stats["origin"] = f"hub:{adapter.hub_name}"
    return _assemble(adapter.name, split_rows, stats, adapter, seed)


def _load_demo() -> SourceData:
    """The demo task: fixed rows (like a hub dataset), its held-out test split as eval."""
    from .demo import demo_dataset

    dd = demo_dataset()
    stats = {"rows_in": len(dd["train"]) + len(dd["test"]),
             "rows_kept": len(dd["train"]) + len(dd["test"]), "skipped_rows": 0,
             "filtered_rows": 0, "train_rows": len(dd["train"]), "eval_rows": len(dd["test"]),
             "eval_from": "eval split", "origin": "chatrl.data.demo"}
    return SourceData(name="demo", train=dd["train"], eval=dd["test"], pairwise=True, stats=stats)


DSCHAT_LOCAL = "local/jsonfile"


def _load_dschat_jsonfile(seed: int, skip_bad_rows: bool) -> SourceData:
    """DeepSpeed-Chat's "local/jsonfile": data/train.json + data/eval.json under the current folder
    (DeepSpeed-Chat read them under its own folder), each a JSON array or JSON lines."""
    files = {"train": Path("data") / "train.json", "eval": Path("data") / "eval.json"}
    missing = [str(f.resolve()) for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f"{DSCHAT_LOCAL} reads data/train.json and data/eval.json under the current "
                        f"folder (DeepSpeed-Chat's layout), but {' and '.join(missing)} "
                        f"{'does' if len(missing) == 1 else 'do'} not exist; "
                        "create both (rows with prompt, chosen and optional rejected), or pass any "
                        "data file itself: --data-path FILE")
    split_rows: dict[str, list[dict]] = {}
    stats: dict = {}
    for split, f in files.items():
        split_rows[split] = [row for rows, numbers in read_file_rows(f).values()
                             for row in adapt_rows(LOCAL.name, rows, source=str(f), stats=stats,
                                                   skip_bad_rows=skip_bad_rows, numbers=numbers)]
    stats["origin"] = str(Path("data").resolve())
    return _assemble(DSCHAT_LOCAL, split_rows, stats, LOCAL, seed)


def _load_arith() -> SourceData:
    """The verifiable arithmetic task as SFT data (worked solutions), its test split as eval."""
    from .arith import arith_sft_rows

    train, test = arith_sft_rows("train"), arith_sft_rows("test", 200)
    stats = {"rows_in": len(train) + len(test), "rows_kept": len(train) + len(test),
             "skipped_rows": 0, "filtered_rows": 0, "train_rows": len(train),
             "eval_rows": len(test), "eval_from": "eval split", "origin": "chatrl.data.arith"}
    return SourceData(name="arith", train=rows_to_dataset(train), eval=rows_to_dataset(test),
                      pairwise=False, stats=stats)


def split_named_spec(spec: str) -> tuple[Adapter | None, str | None]:
    """"Dahoas/rm-static:/path/x.jsonl" -> (that adapter, "/path/x.jsonl"); a bare name ->
    (adapter, None); anything else -> (None, None)."""
    for name, adapter in ADAPTERS.items():
        if spec.lower().startswith(name.lower() + ":"):
            return adapter, spec[len(name) + 1:]
    return find_adapter(spec), None


def load_source(spec: str, *, seed: int = 1234, skip_bad_rows: bool = False) -> SourceData:
    """Load one data source (see the module docstring for the forms of `spec`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data source {spec!r} is empty; pass a named dataset, 'demo' or a local "
                        "file/folder")
    spec = spec.strip()
    if spec.lower() == "demo":
        return _load_demo()
    if spec.lower() == DSCHAT_LOCAL:
        return _load_dschat_jsonfile(seed, skip_bad_rows)
    if spec.lower() == "arith":
        return _load_arith()
    adapter, local = split_named_spec(spec)
    if adapter is not None and local is not None:
        return _load_local(Path(local).expanduser(), adapter, spec, seed, skip_bad_rows)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, LOCAL, spec, seed, skip_bad_rows)
    if adapter is not None:
        return _load_hub(adapter, seed, skip_bad_rows)
    if path.suffix.lower() in DATA_SUFFIXES or spec.startswith((".", "/", "~")):
        raise DataError(f"data file {spec} does not exist; check the path")
    raise DataError(f"data source {spec!r} is neither an existing file or folder nor a known "
                    f"dataset; known names: demo, {', '.join(ADAPTERS)}")
