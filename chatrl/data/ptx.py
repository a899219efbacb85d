"""PTX data: plain text for the pretraining-mixture loss of step 3 (InstructGPT's PPO-ptx).

A source is a hub dataset (`--unsupervised-dataset-name wikitext --unsupervised-dataset-config-name
wikitext-2-raw-v1`, as DeepSpeed-Chat) or a local .txt (one document per line) / .jsonl / .json
file with a `text` field. Texts are tokenized, concatenated with EOS between documents and cut
into blocks of `max_len` tokens; the iterator cycles through seeded shuffles forever.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..errors import DataError


def _texts(name: str, config: str | None) -> list[str]:
    path = Path(name)
    if path.is_file():
        if path.suffix == ".txt":
            return [line for line in path.read_text().splitlines() if line.strip()]
        rows = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                if path.suffix == ".jsonl" else json.loads(path.read_text()))
        texts = [r.get("text") for r in rows if isinstance(r, dict)]
        if not texts or any(not isinstance(t, str) for t in texts):
            raise DataError(f"PTX file {path}: every row needs a string field 'text'")
        return [t for t in texts if t.strip()]
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split="train")
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise DataError(f"could not load the PTX dataset {name!r} (config {config!r}): {e}. Pass a "
                        "local .txt/.jsonl file as --unsupervised-dataset-name when offline") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def ptx_blocks(name: str, config: str | None, tokenizer, max_len: int) -> list[list[int]]:
    ids: list[int] = []
    for text in _texts(name, config):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [ids[i:i + max_len] for i in range(0, len(ids) - 1, max_len)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise DataError(f"the PTX dataset {name!r} holds no text")
    return blocks


def ptx_batches(name: str, config: str | None, tokenizer, max_len: int, batch_size: int,
                seed: int, skip: int = 0) -> Iterator[dict]:
    """Endless LM batches; `skip` batches already consumed (a resumed run continues the stream
    where its checkpoint left it, without collating what it skips)."""
    from .collate import collate_sft

    blocks = ptx_blocks(name, config, tokenizer, max_len)
    rows = [{"input_ids": b, "prompt_len": 0} for b in blocks]
    per_epoch = -(-len(rows) // batch_size)
    epoch, first = divmod(skip, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(first * batch_size, len(order), batch_size):
            yield collate_sft([rows[j] for j in order[i:i + batch_size]], tokenizer.pad_token_id,
                              train_on_prompt=True)
        epoch, first = epoch + 1, 0
