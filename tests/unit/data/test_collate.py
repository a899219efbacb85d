"""Collators on hand-made rows (exact tensors) and the deterministic batch order helpers."""

import pytest
import torch

from chatrl.data import batches, collate_pairs, collate_prompts, collate_sft, epoch_order, shard

PAD = 0


def test_collate_sft_masks_prompt_and_padding():
    rows = [{"input_ids": [5, 6, 7, 8, 2], "prompt_len": 2},
            {"input_ids": [9, 2], "prompt_len": 1}]
    b = collate_sft(rows, PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 2, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Prompt tokens and padding are -100; the response and its EOS (2) are labels.
    assert b["labels"].tolist() == [[-100, -100, 7, 8, 2], [-100, 2, -100, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_sft_train_on_prompt_and_pad_equal_to_a_real_token():
    # pad_id 2 equals the EOS: masks still come from lengths, so the EOS stays a label.
    rows = [{"input_ids": [5, 2], "prompt_len": 1}, {"input_ids": [5, 6, 2], "prompt_len": 1}]
    b = collate_sft(rows, pad_id=2, train_on_prompt=True)
    assert b["input_ids"].tolist() == [[5, 2, 2], [5, 6, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["labels"].tolist() == [[5, 2, -100], [5, 6, 2]]


def test_collate_pairs_chosen_then_rejected():
    rows = [{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 4], "prompt_len": 1},
            {"chosen_input_ids": [7, 8], "rejected_input_ids": [7, 9, 9, 9], "prompt_len": 1}]
    b = collate_pairs(rows, PAD)
    assert set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [7, 8, 0, 0], [1, 4, 0, 0], [7, 9, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_collate_prompts_left_pads_to_longest_prompt():
    rows = [{"prompt_input_ids": [4, 5, 6]}, {"prompt_input_ids": [7]}]
    b = collate_prompts(rows, PAD)
    assert b["input_ids"].tolist() == [[4, 5, 6], [0, 0, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # Tensors as rows work too (e.g. a dataset in torch format).
    b = collate_prompts([{"prompt_input_ids": torch.tensor([3, 3])}], PAD)
    assert b["input_ids"].tolist() == [[3, 3]]


def test_epoch_order_is_a_deterministic_permutation():
    a = epoch_order(10, seed=1, epoch=0)
    assert sorted(a) == list(range(10))
    assert a == epoch_order(10, seed=1, epoch=0)
    assert a != epoch_order(10, seed=1, epoch=1) and a != epoch_order(10, seed=2, epoch=0)
    assert epoch_order(4, seed=1, epoch=0, shuffle=False) == [0, 1, 2, 3]


def test_batches_and_shards():
    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(list(range(7)), 3, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
    g = [10, 11, 12, 13, 14, 15]
    assert [shard(g, r, 2) for r in (0, 1)] == [[10, 12, 14], [11, 13, 15]]
    # A short last batch wraps around so every rank gets as many rows (lockstep).
    assert [shard([1, 2, 3], r, 2) for r in (0, 1)] == [[1, 3], [2, 1]]
    assert [shard([1, 2, 3], r, 2, even=False) for r in (0, 1)] == [[1, 3], [2]]
    assert [shard([1], r, 3) for r in (0, 1, 2)] == [[1], [1], [1]]
    with pytest.raises(ValueError):
        shard(g, 2, 2)
    with pytest.raises(ValueError):
        batches(g, 0)
