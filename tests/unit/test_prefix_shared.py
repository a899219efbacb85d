"""The prefix-shared training forward (stages.shared_prompt_logits): each distinct prompt of a
GRPO batch forwarded once, its KV cache expanded to the G answers. Logits, log-probs and weight
gradients must equal the unshared forward's over left-padded prompts and right-padded answers,
and every case it cannot serve must fall back."""

from __future__ import annotations

import pytest
import torch

from chatrl.models import load_causal_lm, resolve_model_path
from chatrl.rl import gather_logprobs
from chatrl.rl.algorithms import resolve_algorithm
from chatrl.steps import stages
from test_models import randomize  # larger random weights, so position or padding mistakes show

SHARING = ["llama", "qwen2", "gpt2", "opt"]   # the tiny archs that take position ids and a cache


def tiny(arch):
    """Dropout 0 (the actor's default): train mode must then be deterministic to compare."""
    return randomize(load_causal_lm(resolve_model_path(f"tiny-{arch}"), dtype=torch.float32, dropout=0.0))


def grouped_batch(G=3, prompt_lens=(5, 9, 7), answer_lens=None, vocab=400, pad=0, seed=1):
    """Prompts of different lengths left-padded to P, G answers each (consecutive rows) of
    different lengths right-padded to R. Returns seq [N, P + R], mask, action_mask, P."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompt_lens)
    answer_lens = answer_lens or [[6, 2, 4, 5][i % 4] if i % 5 else 6 for i in range(n * G)]
    P, R = max(prompt_lens), max(answer_lens)
    seq = torch.full((n * G, P + R), pad, dtype=torch.long)
    mask = torch.zeros_like(seq)
    for i, pl in enumerate(prompt_lens):
        prompt = torch.randint(1, vocab, (pl,), generator=g)
        for j in range(G):
            r = i * G + j
            seq[r, P - pl:P], mask[r, P - pl:P] = prompt, 1
            al = answer_lens[r]
            seq[r, P:P + al] = torch.randint(1, vocab, (al,), generator=g)
            mask[r, P:P + al] = 1
    return seq, mask, mask[:, P:].clone(), P


def loss_and_grads(model, logits, seq, act, P):
    w = torch.linspace(-1.0, 1.0, seq.shape[0]).unsqueeze(1)   # row weights, like advantages
    lp = gather_logprobs(logits, seq[:, P:])
    loss = (lp * act * w).sum() / act.sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", SHARING)
@pytest.mark.parametrize("G,shuffle", [(3, False), (4, False), (4, True)])
def test_shared_prompt_forward_equals_the_full_forward(arch, G, shuffle):
    model = tiny(arch).train()
    seq, mask, act, P = grouped_batch(G=G)
    if shuffle:   # a shuffled micro-batch (ppo.minibatch_rows): groups no longer consecutive
        perm = torch.randperm(seq.shape[0], generator=torch.Generator().manual_seed(3))
        seq, mask, act = seq[perm], mask[perm], act[perm]
    full = stages.answer_logits(model, seq, mask, P)
    shared = stages.shared_prompt_logits(model, seq, mask, P)
    assert shared is not None, "the shared path must serve this batch"
    assert shared.shape == full.shape == (seq.shape[0], seq.shape[1] - P, model.config.vocab_size)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    lp_full, g_full = loss_and_grads(model, full, seq, act, P)
    lp_shared, g_shared = loss_and_grads(model, shared, seq, act, P)
    torch.testing.assert_close(lp_shared, lp_full, rtol=0, atol=1e-5)
    assert g_full.keys() == g_shared.keys() and len(g_full) == len(list(model.parameters()))
    for name in g_full:
        torch.testing.assert_close(g_shared[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


class Engine(torch.nn.Module):
    """The part of a DeepSpeed engine update_policy uses: forward to `.module`, backward, step."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def experience(seq, mask, act, P, G):
    N, R = act.shape
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(N, R, generator=g) * act
    adv = torch.randn(N, 1, generator=g).expand(N, R) * act
    z = torch.zeros(N, R)
    return stages.Experience(seq, mask, act.float(), P, old, None, None, torch.zeros(N), z, adv, z,
                             group_size=G)


def spy(monkeypatch):
    """Count the shared forwards that served a batch (returned logits)."""
    served, real = [], stages.shared_prompt_logits

    def wrapped(*a, **k):
        out = real(*a, **k)
        served.append(out is not None)
        return out

    monkeypatch.setattr(stages, "shared_prompt_logits", wrapped)
    return served


def test_update_policy_and_forward_logprobs_share_the_prompt(monkeypatch):
    served = spy(monkeypatch)
    model = tiny("llama").train()
    seq, mask, act, P = grouped_batch(G=4)
    algo = resolve_algorithm("grpo")
    grads = {}
    for G in (1, 4):
        model.zero_grad(set_to_none=True)
        loss, _ = stages.update_policy(Engine(model), experience(seq, mask, act, P, G), algo,
                                       temperature=0.7, max_len=act.shape[1])
        grads[G] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()})
    assert served == [True]   # group_size 1 never tries; group_size 4 shares
    torch.testing.assert_close(grads[4][0], grads[1][0], rtol=0, atol=1e-6)
    for name, g in grads[1][1].items():
        torch.testing.assert_close(grads[4][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    lp = [stages.forward_logprobs(model, seq, mask, P, 0.7, "cpu", eval_mode=True, group_size=G)
          for G in (1, 4)]
    assert served == [True, True] and model.training   # eval_mode restores training mode
    torch.testing.assert_close(lp[1], lp[0], rtol=0, atol=1e-5)


def test_fallbacks(monkeypatch):
    seq, mask, _, P = grouped_batch(G=3)
    model = tiny("llama").train()
    # no prompt repeated in the batch: nothing to share
    assert stages.shared_prompt_logits(model, seq[::3], mask[::3], P) is None
    # group size 1: answer_logits never tries the shared path
    served = spy(monkeypatch)
    stages.answer_logits(model, seq, mask, P, group_size=1)
    assert served == []
    # gradient checkpointing in training: HF drops the cache, so the full forward runs
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as ds.py
    full = stages.answer_logits(model, seq, mask, P, group_size=3)
    assert served == [False]
    model.eval()   # checkpointing acts in training only: an eval forward (rollout recompute) shares
    assert stages.shared_prompt_logits(model, seq, mask, P) is not None
    model.train().gradient_checkpointing_disable()
    torch.testing.assert_close(full, stages.answer_logits(model, seq, mask, P), rtol=0, atol=1e-6)
    # BLOOM (ALiBi, no position ids): a continued forward could not be told the positions
    bloom = tiny("bloom")
    assert stages.shared_prompt_logits(bloom, seq, mask, P) is None
    torch.testing.assert_close(stages.answer_logits(bloom, seq, mask, P, group_size=3),
                               stages.answer_logits(bloom, seq, mask, P), rtol=0, atol=0)


@pytest.mark.parametrize("arch", SHARING + ["bloom"])
def test_answer_logits_equal_the_full_forward_and_are_contiguous(arch):
    """The answer logits are computed at the answer positions only (a tensor of positions for
    logits_to_keep where the model takes one) and equal the full forward's, sliced, with the
    same weight gradients; they come out contiguous (no copy of the logits in gather_logprobs)."""
    model = tiny(arch).train()
    seq, mask, act, P = grouped_batch(G=1)
    logits = stages.answer_logits(model, seq, mask, P)
    assert stages.accepts_logit_positions(model) and logits.is_contiguous()
    full = model(**stages.model_inputs(model, seq, mask), use_cache=False).logits[:, P - 1:-1]
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
    lp, grads = loss_and_grads(model, logits, seq, act, P)
    lp_full, grads_full = loss_and_grads(
        model, model(**stages.model_inputs(model, seq, mask), use_cache=False).logits[:, P - 1:-1], seq, act, P)
    torch.testing.assert_close(lp, lp_full, rtol=0, atol=1e-5)
    assert grads.keys() == grads_full.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_full[n], rtol=1e-4, atol=1e-6, msg=n)


def prefill_rows(model):
    """A forward pre-hook that records [rows, tokens] of each forward's input_ids."""
    seen = []
    handle = model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                                    else args[0]).shape)), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("arch", SHARING)
def test_a_rollout_prefills_each_distinct_prompt_once(arch):
    """GRPO/RLOO rollouts repeat each prompt G times: hf_generate(shared_prompts=True) forwards the
    first P - 1 tokens of each distinct prompt once and generate() continues every row from that
    cache. The tokens (greedy) and recorded log-probs equal the unshared rollout's."""
    from chatrl.engine.hybrid import GenerationParams, hf_generate

    model = tiny(arch).eval()
    seq, mask, _, P = grouped_batch(G=3)
    ids, am = seq[:, :P], mask[:, :P]
    params = GenerationParams(max_new_tokens=6, temperature=0.0, eos_token_id=None, pad_token_id=0)
    runs = {}
    for shared in (False, True):
        seen, handle = prefill_rows(model)
        try:
            runs[shared] = hf_generate(model, ids, am, params, return_logprobs=True, shared_prompts=shared)
        finally:
            handle.remove()
        runs[shared, "rows"] = seen
    N = ids.shape[0]
    assert runs[False, "rows"][0] == (N, P)                      # every row prefilled
    assert runs[True, "rows"][:2] == [(3, P - 1), (N, 1)]        # 3 prompts once, then each row's last token
    assert all(r == (N, 1) for r in runs[True, "rows"][1:])
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(runs[True].logprobs, runs[False].logprobs, rtol=0, atol=1e-5)


def test_rollout_shares_the_prefill_only_with_several_answers_per_prompt(monkeypatch):
    """stages.rollout asks the backend to share the prompt's prefill when it repeats each prompt
    (n_samples > 1), never for one answer per prompt (the trunk recorder then needs every row)."""
    import chatrl.engine.hybrid as hybrid
    from chatrl.engine.hybrid import GenerationParams

    asked = []

    class Backend:
        def generate(self, ids, mask, params, return_logprobs=False, synced_gpus=False, shared_prompts=False):
            asked.append(shared_prompts)
            return hybrid.hf_generate(model, ids, mask, params, return_logprobs, synced_gpus, shared_prompts)

    class Hybrid:
        def generate(self, ids, mask, params, return_logprobs=False, shared_prompts=False):
            return Backend().generate(ids, mask, params, return_logprobs, shared_prompts=shared_prompts)

    model = tiny("llama").eval()
    seq, mask, _, P = grouped_batch(G=1)
    params = GenerationParams(max_new_tokens=4, temperature=0.7, eos_token_id=1, pad_token_id=0)
    for n in (1, 4):
        ro = stages.rollout(Hybrid(), seq[:, :P], mask[:, :P], params, n_samples=n)
        assert ro.sequences.shape[0] == seq.shape[0] * n
    assert asked == [False, True]


@pytest.mark.parametrize("arch", SHARING)
def test_a_reward_model_scores_each_distinct_prompt_once(arch):
    """The reward source of a GRPO/RLOO rollout (rows repeat prompts): RewardModel.
    shared_prompt_scores forwards each distinct prompt once and gives score()'s scores, also
    for answers of one token and with DeepSpeed-Chat's score-before-EOS convention."""
    from chatrl.models.reward import RewardModel
    from chatrl.rewards import ScoringBatch
    from chatrl.rewards.model import RewardModelSource

    rm = RewardModel.from_pretrained(resolve_model_path(f"tiny-{arch}"), dtype="fp32", dropout=0.0)
    randomize(rm.backbone)
    torch.nn.init.normal_(rm.v_head.weight, std=1.0)
    rm.eval()
    seq, mask, _, P = grouped_batch(G=3, answer_lens=[6, 1, 4, 5, 6, 2, 1, 3, 6])
    with torch.no_grad():
        full = rm.score(seq, mask)
        seen, handle = prefill_rows(rm.backbone)
        try:
            shared = rm.shared_prompt_scores(seq, mask, P)
        finally:
            handle.remove()
    assert seen == [(3, P), (9, seq.shape[1] - P)]
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    rm.score_before_token = int(seq[0, P + 2])   # an answer token read one position back
    with torch.no_grad():
        torch.testing.assert_close(rm.shared_prompt_scores(seq, mask, P), rm.score(seq, mask), rtol=0, atol=1e-5)
    rm.score_before_token = None
    # the reward source takes the shared path only when the batch says rows repeat prompts
    source = RewardModelSource(rm)
    batch = ScoringBatch(prompts=[""] * 9, completions=[""] * 9, texts=[""] * 9, sequences=seq, attention_mask=mask)
    for shared_len, rows in ((None, (9, seq.shape[1])), (P, (3, P))):
        batch.shared_prompt_len = shared_len
        seen, handle = prefill_rows(rm.backbone)
        try:
            torch.testing.assert_close(source(batch), full, rtol=0, atol=1e-5)
        finally:
            handle.remove()
        assert seen[0] == rows
    # nothing to share: no prompt repeats
    assert rm.shared_prompt_scores(seq[::3], mask[::3], P) is None
