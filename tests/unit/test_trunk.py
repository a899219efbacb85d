"""Frozen-trunk sharing (chatrl.engine.trunk): the output of the frozen lower blocks, recorded in a
forward of the frozen twin, replayed into the trained model's forward. Logits and weight
gradients must equal the model's own full forward on every tiny architecture, for the whole
batch and for a shuffled, trimmed sub-batch (Experience.select); the blocks must really be
skipped; a batch of another shape must fall back to running them; and every case where the
states would differ must be refused with its reason."""

from __future__ import annotations

import copy

import pytest
import torch

from chatrl.engine.trunk import TrunkShare, frozen_cut, why_not_shared
from chatrl.models import load_causal_lm, resolve_model_path
from chatrl.models.freeze import freeze_lower_layers, transformer_blocks
from chatrl.models.reward import RewardModel
from chatrl.models.tiny import TINY_ARCHS
from chatrl.rl import gather_logprobs
from chatrl.steps.stages import Experience, answer_logits, answer_values

from test_models import randomize


def batch(n=4, P=7, R=5, seed=0):
    """Left-padded prompts of different lengths, right-padded answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, 300, (n, P + R), generator=g)
    mask = torch.ones_like(seq)
    for i, (pad, ans) in enumerate([(2, 5), (0, 3), (3, 4), (1, 5)][:n]):
        mask[i, :pad] = 0
        mask[i, P + ans:] = 0
    return seq * mask, mask, mask[:, P:].clone(), P


def experience(seq, mask, act, P, hidden):
    z = torch.zeros(act.shape)
    return Experience(seq, mask, act, P, z, z, z, torch.zeros(len(seq)), z, z, z,
                      trunk={"actor": hidden})


def grads_of(model, logits, seq, P, act):
    lp = gather_logprobs(logits, seq[:, P:])
    w = torch.linspace(-1, 1, len(seq)).unsqueeze(1)
    model.zero_grad(set_to_none=True)
    (lp * act * w).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (lp_a, g_a), (lp_b, g_b) = a, b
    assert torch.allclose(lp_a, lp_b, atol=1e-5, rtol=1e-4)
    assert g_a.keys() == g_b.keys() and g_a
    for k in g_a:
        assert torch.allclose(g_a[k], g_b[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_replayed_trunk_equals_the_full_forward(arch):
    model = randomize(load_causal_lm(resolve_model_path(f"tiny-{arch}"), dropout=0.0))
    twin = copy.deepcopy(model).eval().requires_grad_(False)   # the reference model
    freeze_lower_layers(model, 1)
    model.train()
    assert frozen_cut(model) == 1 and why_not_shared(model, twin) is None
    share = TrunkShare(1, "actor")
    seq, mask, act, P = batch()
    with share.capture(twin), torch.no_grad():
        answer_logits(twin, seq, mask, P)
    hidden = share.taken()
    assert hidden is not None and hidden.shape[:2] == seq.shape

    full = grads_of(model, answer_logits(model, seq, mask, P), seq, P, act)
    exp = experience(seq, mask, act, P, hidden)
    with share.reuse(model, exp.trunk["actor"]):
        assert_same(grads_of(model, answer_logits(model, seq, mask, P), seq, P, act), full)

    # a shuffled sub-batch, trimmed to the columns its rows use (as a PPO mini-batch)
    sub = exp.select(torch.tensor([2, 0]))
    assert sub.sequences.shape[1] < seq.shape[1] and sub.trunk["actor"].shape[:2] == sub.sequences.shape
    ref = grads_of(model, answer_logits(model, sub.sequences, sub.attention_mask, sub.prompt_len),
                   sub.sequences, sub.prompt_len, sub.action_mask)
    with share.reuse(model, sub.trunk["actor"]):
        got = grads_of(model, answer_logits(model, sub.sequences, sub.attention_mask, sub.prompt_len),
                       sub.sequences, sub.prompt_len, sub.action_mask)
    assert_same(got, ref)

    # the frozen block really is skipped: spoil its weights, the replayed forward does not change
    with torch.no_grad():
        for p in transformer_blocks(model)[0].parameters():
            p.mul_(0.0).add_(3.0)
        with share.reuse(model, hidden):
            spoiled_replay = answer_logits(model, seq, mask, P)
        spoiled_full = answer_logits(model, seq, mask, P)
        # a batch of another shape: the blocks run (with the spoiled weights)
        plain = answer_logits(model, seq[:, 1:], mask[:, 1:], P - 1)
        with share.reuse(model, hidden):
            other = answer_logits(model, seq[:, 1:], mask[:, 1:], P - 1)
    assert torch.allclose(gather_logprobs(spoiled_replay, seq[:, P:]), full[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(spoiled_full, spoiled_replay, atol=1e-3), "the blocks ran anyway"
    assert torch.equal(plain, other)
    assert all("forward" not in vars(b) for b in transformer_blocks(model))  # restored


def test_critic_states_recorded_in_its_own_scoring_forward(tiny_model_path):
    critic = randomize(RewardModel.from_pretrained(tiny_model_path, dropout=0.0))
    freeze_lower_layers(critic, 1)
    assert why_not_shared(critic) is None
    share = TrunkShare(frozen_cut(critic), "critic")
    seq, mask, act, P = batch()
    critic.eval()
    with torch.no_grad(), share.capture(critic):
        old = answer_values(critic, seq, mask, P)
    critic.train()
    hidden = share.taken()
    values = answer_values(critic, seq, mask, P)
    values.sum().backward()
    g_full = {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}
    critic.zero_grad(set_to_none=True)
    with share.reuse(critic, hidden):
        replayed = answer_values(critic, seq, mask, P)
    replayed.sum().backward()
    assert torch.allclose(replayed, values, atol=1e-6) and torch.allclose(old, values, atol=1e-6)
    assert "v_head.weight" in g_full
    for n, p in critic.named_parameters():
        if n in g_full:
            assert torch.allclose(p.grad, g_full[n], atol=1e-5, rtol=1e-4), n


def test_where_it_does_not_apply(tiny_model_path):
    from chatrl.models.lora import apply_lora

    path = tiny_model_path
    model = load_causal_lm(path, dropout=0.0)
    assert why_not_shared(model) == "no frozen lower blocks"  # nothing frozen
    twin = copy.deepcopy(model)
    freeze_lower_layers(model, 1)
    with torch.no_grad():
        next(transformer_blocks(twin)[0].parameters()).add_(1.0)
    assert why_not_shared(model, twin).startswith("the frozen weights differ")
    dropped = load_causal_lm(path, dropout=0.1)
    freeze_lower_layers(dropped, 1)
    assert why_not_shared(dropped) == "dropout"
    lora = apply_lora(load_causal_lm(path, dropout=0.0), rank=2)
    freeze_lower_layers(lora, 1)
    assert why_not_shared(lora) == "LoRA"


def replay_against_reference(share, ref, recorded, seq, mask, P):
    """(the reference's own trunk output over seq, its full-forward log-probs, its log-probs
    with `recorded` replayed) for a rollout's recorded trunk states."""
    from chatrl.steps.stages import forward_logprobs

    assert recorded is not None and recorded.shape[:2] == seq.shape
    with torch.no_grad(), share.capture(ref):
        ref_lp = forward_logprobs(ref, seq, mask, P, 1.0, "cpu")
    direct = share.taken()
    with torch.no_grad(), share.reuse(ref, recorded):
        replayed_lp = forward_logprobs(ref, seq, mask, P, 1.0, "cpu")
    return direct, ref_lp, replayed_lp


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rollout_records_the_trunk_the_reference_forward_would(arch):
    """An fp32 rollout with the trained model records the frozen blocks' output at every
    position it forwards (capture_steps): at every real token it equals the twin's full
    forward, and the reference log-probs replayed from it equal the full reference forward's.
    Left-padded prompts; sampled answers that end at different lengths."""
    from chatrl.engine.hybrid import GenerationParams, hf_generate
    from chatrl.steps.ppo import _rollout_states
    from chatrl.steps.stages import response_mask

    actor = randomize(load_causal_lm(resolve_model_path(f"tiny-{arch}"), dtype=torch.float32, dropout=0.0))
    ref = copy.deepcopy(actor).eval()
    freeze_lower_layers(actor, 1)
    assert why_not_shared(actor, ref) is None
    share = TrunkShare(frozen_cut(actor), "actor", ref)
    seq, mask, _, P = batch()
    ids, pmask = seq[:, :P], mask[:, :P]
    torch.manual_seed(0)
    eos = 7
    params = GenerationParams(max_new_tokens=6, temperature=1.0, eos_token_id=eos, pad_token_id=0)
    actor.eval()
    with torch.no_grad(), share.capture_steps(actor):
        gen = hf_generate(actor, ids, pmask, params, return_logprobs=True)
    answer = gen.sequences[:, P:]
    act = response_mask(answer, eos)
    full_seq = torch.cat([ids, torch.where(act.bool(), answer, torch.zeros_like(answer))], 1)
    full_mask = torch.cat([pmask, act.long()], 1)
    recorded = _rollout_states(share.taken(), full_seq)
    if arch == "bloom":   # its blocks return tuples (hidden, cache): nothing recorded, the
        assert recorded is None   # reference forward then runs in full
        return
    direct, ref_lp, replayed_lp = replay_against_reference(share, ref, recorded, full_seq, full_mask, P)
    real = full_mask.bool().clone()
    real[:, -1] = False   # the last token is never forwarded by the rollout
    assert torch.allclose(recorded[real], direct[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(replayed_lp * act, ref_lp * act, atol=1e-5, rtol=0)
    # another shape records nothing usable: the caller then runs the full reference forward
    assert _rollout_states(recorded[:, :P], full_seq) is None


def test_answer_groups_record_no_trunk_and_keep_one_copy_of_the_frozen_weights(tiny_model_path, capsys):
    """With G answers per prompt the scoring and training passes forward each distinct prompt
    once (stages.shared_prompt_logits) and replay no trunk: the log says so (it once claimed the
    frozen blocks ran once per rollout), and the reference still borrows the actor's frozen
    weights instead of holding a second copy."""
    from types import SimpleNamespace

    from chatrl.engine.trunk import trunk_shares

    def bundle():
        actor = load_causal_lm(tiny_model_path, dropout=0.0)
        freeze_lower_layers(actor, 1)
        ref = copy.deepcopy(actor).requires_grad_(False)
        return SimpleNamespace(actor=SimpleNamespace(module=actor), ref=ref, critic=None, reward=None)

    one = bundle()
    assert set(trunk_shares(one)) == {"actor"}
    assert "run once per rollout" in capsys.readouterr().err
    groups = bundle()
    assert trunk_shares(groups, group_size=4) == {}
    log = capsys.readouterr().err
    assert "computed in every pass (4 answers per prompt" in log and "run once per rollout" not in log, log
    frozen = next(transformer_blocks(groups.actor.module)[0].parameters())
    twin = next(transformer_blocks(groups.ref)[0].parameters())
    assert frozen.data_ptr() == twin.data_ptr()
