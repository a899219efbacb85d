"""Batching: a deterministic, resumable row order, batches, per-rank shards, and collators.

Order. Training loops do not use a DataLoader sampler; they ask for
    order = epoch_order(len(ds), seed, epoch)       # a permutation fixed by (seed, epoch)
    for step, global_batch in enumerate(batches(order, per_rank_batch * world_size)):
        mine = shard(global_batch, rank, world_size)  # this rank's rows
        batch = collate_sft([ds[i] for i in mine], pad_id)
so resuming at (epoch, step) replays exactly the same rows without saving sampler state, and
every rank agrees on the order without communicating. `shard` gives rank r the rows r, r+W,
r+2W... of the global batch; a short last batch is topped up by wrapping around so every rank
gets the same number of rows and stays in lockstep (pass even=False for the plain stride, or
drop_last=True to `batches` to skip short batches).

Collators pad to the batch's longest row only (rows are stored unpadded) and build every mask
from the rows' lengths, never by comparing ids with pad_id (which may equal a real token).
Labels are not shifted: Hugging Face causal LMs shift them inside their loss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of rows 0..n_rows-1 for one epoch: a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return list(range(n_rows))
    return np.random.default_rng([seed, epoch]).permutation(n_rows).tolist()


def batches(order: Sequence[int], batch_size: int, drop_last: bool = False) -> list[list[int]]:
    """Consecutive chunks of `order` of `batch_size` rows (the last may be shorter unless
    drop_last)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out


def shard(batch_indices: Sequence[int], rank: int, world_size: int, even: bool = True) -> list[int]:
    """Rank `rank`'s strided share of a global batch: items rank, rank + world_size, ...

    even=True wraps around the batch so every rank gets ceil(len / world_size) rows (lockstep
    for collective operations); even=False returns the plain stride (possibly shorter or empty).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    items = list(batch_indices)
    if even and items:
        per_rank = -(-len(items) // world_size)
        while len(items) < per_rank * world_size:
            items += items[:per_rank * world_size - len(items)]
    return items[rank::world_size]


def _ids(x) -> list[int]:
    return x.tolist() if isinstance(x, Tensor) else list(x)


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """[B, T] ids and attention mask, T = longest row; padding on the right (or left)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        row = torch.as_tensor(s, dtype=torch.long)
        if left:
            ids[i, width - len(s):] = row
            mask[i, width - len(s):] = 1
        else:
            ids[i, :len(s)] = row
            mask[i, :len(s)] = 1
    return ids, mask


def collate_sft(rows: list[dict], pad_id: int, train_on_prompt: bool = False) -> dict[str, Tensor]:
    """SFT batch: right-padded input_ids [B, T], attention_mask [B, T], labels [B, T].

    labels = input_ids with -100 on padding and, unless train_on_prompt, on the first
    prompt_len tokens; the response and its EOS are labels.
    """
    seqs = [_ids(r["input_ids"]) for r in rows]
    ids, mask = _pad(seqs, pad_id)
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    if not train_on_prompt:
        for i, r in enumerate(rows):
            labels[i, :int(r["prompt_len"])] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Reward-model batch: input_ids / attention_mask [2B, T], right-padded; rows 0..B-1 are the
    chosen sequences, rows B..2B-1 the rejected ones in the same order (pair i = rows i, B+i)."""
    seqs = [_ids(r["chosen_input_ids"]) for r in rows] + [_ids(r["rejected_input_ids"]) for r in rows]
    ids, mask = _pad(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def collate_prompts(rows: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Generation batch: LEFT-padded prompt input_ids / attention_mask [B, P], P = longest prompt
    of the batch, so every prompt ends at the last column where generation continues."""
    seqs = [_ids(r["prompt_input_ids"] if "prompt_input_ids" in r else r["input_ids"]) for r in rows]
    ids, mask = _pad(seqs, pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask}
