"""DAPO's dynamic sampling in step 3's collect stage: groups whose answers all scored the same are
dropped, more prompts are drawn until the batch is full, and the kept groups form one experience
(re-padded). A stub trainer returns scripted experiences, so every count is known by hand."""

from types import SimpleNamespace

import torch

from chatrl.rl import resolve_algorithm
from chatrl.steps.ppo import Experience, PromptStream, collect_experience


def scripted(scores, prompt_len, answer_len, tag):
    """An experience of len(scores) answers; sequences carry `tag` so rows can be traced."""
    B = len(scores)
    seq = torch.full((B, prompt_len + answer_len), tag, dtype=torch.long)
    mask = torch.ones_like(seq)
    act = torch.ones(B, answer_len)
    s = torch.tensor(scores, dtype=torch.float32)
    z = torch.zeros(B, answer_len)
    adv = (s - s.mean())[:, None].expand(B, answer_len).clone()
    return Experience(seq, mask, act, prompt_len, z, None, None, s, z, adv, adv, group_size=2,
                      rows=[{"tag": tag, "i": i} for i in range(B)])


class StubTrainer:
    def __init__(self, batches, algo):
        self.batches = list(batches)
        self.algo = algo
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.calls = 0
        self.last_stats = {}

    def make_experience(self, input_ids, attention_mask, rows=None):
        exp = self.batches[self.calls]
        self.calls += 1
        self.last_stats = {"reward/score": float(exp.scores.mean())}
        return exp


def prompts(n):
    return [{"prompt_input_ids": [1, 2, 3]} for _ in range(n)]


def test_drops_equal_groups_and_refills_from_more_batches():
    algo = resolve_algorithm("dapo", num_generations=2)
    # 2 prompts per batch, G = 2: groups (scores) of each scripted batch
    b1 = scripted([1, 1, 0, 1], 3, 2, tag=11)      # group 0 all equal (dropped), group 1 kept
    b2 = scripted([0, 0, 0, 0], 5, 4, tag=22)      # both dropped
    b3 = scripted([1, 0, 1, 1], 2, 3, tag=33)      # group 0 kept, group 1 dropped
    tr = StubTrainer([b1, b2, b3], algo)
    stream = PromptStream(20, seed=0, global_batch=2, per_epoch=10)
    exps, stats, sampling = collect_experience(tr, stream, prompts(20), n_batches=1, gb=2, rank=0,
                                               max_rounds=4)
    assert tr.calls == 3 and len(stats) == 3 and sampling == {"sampling/rounds": 3.0,
                                                                "sampling/filled_groups": 0.0}
    (exp,) = exps
    assert exp.batch_size == 4  # 2 groups x 2 answers
    # the kept groups, in order: b1's second group, b3's first group
    assert exp.scores.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert [r["tag"] for r in exp.rows] == [11, 11, 33, 33] and [r["i"] for r in exp.rows] == [2, 3, 0, 1]
    # re-padded: prompt to the longest (3), answers to the longest (3); masks follow
    assert exp.prompt_len == 3 and exp.action_mask.shape == (4, 3)
    assert exp.action_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert exp.attention_mask[2].tolist() == [0, 1, 1, 1, 1, 1]  # b3 row: 1 left pad
    assert exp.sequences[2, 0].item() == 0 and exp.sequences[2, 1].item() == 33
    assert exp.advantages[0].tolist() == [-0.75, -0.75, 0.0]  # b1 row 2: 0 - mean 0.75, padded
    assert stream.state() == {"epoch": 0, "batch_in_epoch": 3}


def test_gives_up_after_max_rounds_and_fills_with_dropped_groups():
    algo = resolve_algorithm("dapo", num_generations=2)
    tr = StubTrainer([scripted([1, 1, 0, 0], 2, 2, tag=i) for i in range(5)], algo)
    stream = PromptStream(20, seed=0, global_batch=2, per_epoch=10)
    exps, _, sampling = collect_experience(tr, stream, prompts(20), n_batches=1, gb=2, rank=0,
                                           max_rounds=2)
    assert tr.calls == 2 and sampling["sampling/filled_groups"] == 2.0
    assert exps[0].batch_size == 4


def test_without_dynamic_sampling_every_batch_is_kept():
    algo = resolve_algorithm("grpo", num_generations=2)
    tr = StubTrainer([scripted([1, 1, 0, 0], 2, 2, tag=i) for i in range(2)], algo)
    stream = PromptStream(20, seed=0, global_batch=2, per_epoch=10)
    exps, stats, sampling = collect_experience(tr, stream, prompts(20), n_batches=2, gb=2, rank=0,
                                               max_rounds=4)
    assert len(exps) == 2 and sampling == {} and tr.calls == 2


def test_prompt_stream_epochs_and_state():
    s = PromptStream(10, seed=3, global_batch=3, per_epoch=2)
    seen = [s.next() for _ in range(5)]
    assert all(len(b) == 3 for b in seen)
    assert s.state() == {"epoch": 2, "batch_in_epoch": 1}
    # resuming at a state draws the same next batch
    r = PromptStream(10, seed=3, global_batch=3, per_epoch=2, epoch=1, batch=1)
    s2 = PromptStream(10, seed=3, global_batch=3, per_epoch=2)
    for _ in range(3):
        s2.next()
    assert r.next() == s2.next()
