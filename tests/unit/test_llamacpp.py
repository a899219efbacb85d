"""The llama.cpp rollout backend (chatrl.engine.llamacpp) on the tiny Llama (GQA, 2 blocks) and
the tiny Qwen2 (q/k/v biases, 1 KV head).

- With `same` weights it samples the trained policy: the same tokens as the Transformers backend
  under the same seed (left-padded prompts of different lengths, rows that stop early), and
  log-probs equal to a full fp32 forward's; with tied and untied LM heads.
- fp16 and q8_0 change the weights' rounding and nothing else: a gap above fp32 noise and small.
- Frozen tensors are converted once; trained ones every rollout, even when an optimizer wrote them
  through `.data` (whose version counter the cache must not trust).
- LoRA adapters are folded in; more rows than one llama.cpp context takes are split and joined.
- Models it cannot convert are named with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from chatrl.engine import llamacpp  # noqa: E402
from chatrl.engine.hybrid import GenerationParams, hf_generate  # noqa: E402
from chatrl.engine.llamacpp import LlamaCppBackend, unsupported  # noqa: E402
from chatrl.models import load_causal_lm  # noqa: E402
from chatrl.models.load import model_inputs  # noqa: E402
from chatrl.models.lora import apply_lora, lora_merged  # noqa: E402

from test_models import randomize  # noqa: E402


def _model(path, tied=True, eos=None):
    model = load_causal_lm(path, "fp32").eval()
    if not tied:
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = False
        model = AutoModelForCausalLM.from_config(config).eval()
    randomize(model, seed=1)
    if eos is not None:  # EOS's output row along the mean final state: some rows stop early
        ids, mask = _prompts(7)
        with torch.no_grad():
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
            d = h.mean(0) / h.mean(0).norm()
            model.get_output_embeddings().weight[eos] = 2.0 * d / (h @ d).mean()
    return model


def _prompts(n=4, seed=0):
    """Left-padded rows of 3-9 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 6, 5, 8, 4, 7][:n]
    ids = torch.full((n, max(lengths)), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n_tok in enumerate(lengths):
        ids[i, -n_tok:] = torch.randint(5, 400, (n_tok,), generator=g)
        mask[i, -n_tok:] = 1
    return ids, mask


def _params(tok, temperature=1.0, n=12, **kw):
    return GenerationParams(max_new_tokens=n, temperature=temperature, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **kw)


def _answer_mask(seq, width, eos):
    """Answer tokens up to and including each row's first EOS."""
    ans = seq[:, width:]
    after = (ans == eos).long().cumsum(1) - (ans == eos).long()
    return after == 0


@torch.no_grad()
def _full_forward_logprobs(model, seq, mask, width, temperature):
    am = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - width, dtype=mask.dtype)], 1)
    logits = model(**model_inputs(model, seq, am)).logits[:, width - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, seq[:, width:, None]).squeeze(-1)


def _rollout(backend, model, ids, mask, params, seed=0, share=True):
    if share:
        backend.share(model)
    torch.manual_seed(seed)
    return backend.generate(ids, mask, params, return_logprobs=True)


def _same_rollout_as_transformers(model, tok, ids, mask):
    """A `same` llama.cpp rollout and a Transformers one under the same seed: the same tokens,
    and the llama.cpp log-probs within 1e-4 of a full fp32 forward. -> (ours, theirs, answer mask)"""
    params = _params(tok)
    ours = _rollout(LlamaCppBackend(model.config, "cpu", "same"), model, ids, mask, params)
    torch.manual_seed(0)
    theirs = hf_generate(model, ids, mask, params, return_logprobs=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    valid = _answer_mask(ours.sequences, ids.shape[1], tok.eos_token_id)
    ref = _full_forward_logprobs(model, ours.sequences, mask, ids.shape[1], 1.0)
    assert (ours.logprobs - ref)[valid].abs().max() < 1e-4
    return ours, theirs, valid


@pytest.mark.parametrize("tied", [True, False])
def test_same_weights_sample_the_trained_policy(tiny_model_path, tiny_tokenizer, tied):
    tok = tiny_tokenizer
    model = _model(tiny_model_path, tied, eos=tok.eos_token_id)
    ids, mask = _prompts()
    ours, theirs, valid = _same_rollout_as_transformers(model, tok, ids, mask)
    stops = (ours.sequences[:, ids.shape[1]:] == tok.eos_token_id).any(1)
    assert 0 < stops.sum() < len(stops), ours.sequences  # some rows stopped early, some did not
    assert (ours.logprobs - theirs.logprobs)[valid].abs().max() < 1e-4
    assert (ours.entropy - theirs.entropy)[valid].abs().max() < 1e-3
    # rows that stopped are padded after their EOS, as Transformers pads them
    for row in ours.sequences[:, ids.shape[1]:]:
        hit = (row == tok.eos_token_id).nonzero()
        if len(hit):
            assert (row[hit[0, 0] + 1:] == tok.pad_token_id).all()


def test_qwen2_with_its_biases_samples_the_trained_policy():
    """Qwen2 (q/k/v biases, Transformers' rotary layout kept as is, 1 KV head): the same tokens
    and log-probs as Transformers."""
    from chatrl.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("tiny-qwen2")
    tok = load_tokenizer(path)
    model = _model(path, eos=tok.eos_token_id)
    with torch.no_grad():  # sharp attention: a wrong rotary layout must show in the tokens
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(6.0)
                proj.bias.mul_(6.0)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    _same_rollout_as_transformers(model, tok, *_prompts())


def test_greedy_min_new_tokens_and_temperature_match_transformers(tiny_model_path, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model(tiny_model_path, eos=tok.eos_token_id)
    ids, mask = _prompts(3, seed=2)
    backend = LlamaCppBackend(model.config, "cpu", "same")
    for params in (_params(tok, 0.0), _params(tok, 0.7, top_p=0.9, top_k=40, min_new_tokens=12)):
        ours = _rollout(backend, model, ids, mask, params, seed=3)
        torch.manual_seed(3)
        theirs = hf_generate(model, ids, mask, params, return_logprobs=True)
        assert torch.equal(ours.sequences, theirs.sequences), params
    assert ours.sequences.shape[1] == ids.shape[1] + 12
    assert not (ours.sequences[:, ids.shape[1]:-1] == tok.eos_token_id).any()  # held back


@pytest.mark.parametrize("kind,low,high", [("fp16", 1e-6, 2e-2), ("q8_0", 1e-4, 0.3)])
def test_fp16_and_q8_rollouts_differ_by_their_rounding_alone(tiny_model_path, tiny_tokenizer, kind,
                                                             low, high):
    tok = tiny_tokenizer
    model = _model(tiny_model_path)
    ids, mask = _prompts()
    params = _params(tok, n=16)
    out = _rollout(LlamaCppBackend(model.config, "cpu", kind), model, ids, mask, params)
    valid = _answer_mask(out.sequences, ids.shape[1], tok.eos_token_id)
    gap = (out.logprobs - _full_forward_logprobs(model, out.sequences, mask, ids.shape[1], 1.0))[valid].abs()
    assert low < gap.mean() < high, gap.mean()


def test_frozen_tensors_are_converted_once_trained_ones_every_rollout(tiny_model_path, tiny_tokenizer):
    tok = tiny_tokenizer
    model = _model(tiny_model_path)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    ids, mask = _prompts()
    params = _params(tok, 0.0)
    backend = LlamaCppBackend(model.config, "cpu", "same")
    _rollout(backend, model, ids, mask, params)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(backend._cache) == frozen
    cached = {n: backend._cache[n][0] for n in frozen}
    # an optimizer step writes through .data: the trained block must be read again
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.data.mul_(-3.0)
        model.model.norm.weight.data.add_(0.5)
    ours = _rollout(backend, model, ids, mask, params)
    assert all(backend._cache[n][0] is cached[n] for n in frozen)  # not converted again
    theirs = hf_generate(model, ids, mask, params)
    assert torch.equal(ours.sequences, theirs.sequences)


def test_lora_adapters_are_folded_into_the_rollout_weights(tiny_model_path, tiny_tokenizer):
    tok = tiny_tokenizer
    model = apply_lora(_model(tiny_model_path), 4, 8.0, "", only_optimize=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, mask = _prompts()
    params = _params(tok, 0.0)
    backend = LlamaCppBackend(model.config, "cpu", "same")
    ours = _rollout(backend, model, ids, mask, params)
    with lora_merged(model):
        theirs = hf_generate(model, ids, mask, params)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert not backend._cache or all("lora" not in n for n in backend._cache)


def test_more_rows_than_one_context_are_split_and_joined(tiny_model_path, tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    model = _model(tiny_model_path, eos=tok.eos_token_id)
    ids, mask = _prompts(7, seed=4)
    params = _params(tok, 0.0, n=10)
    backend = LlamaCppBackend(model.config, "cpu", "same")
    whole = _rollout(backend, model, ids, mask, params)
    monkeypatch.setattr(llamacpp, "_MAX_SEQS", 3)
    parts = _rollout(backend, model, ids, mask, params, share=False)
    assert torch.equal(parts.sequences, whole.sequences)
    valid = _answer_mask(whole.sequences, ids.shape[1], tok.eos_token_id)
    assert (parts.logprobs - whole.logprobs)[valid].abs().max() < 1e-5


def test_models_it_cannot_convert_are_named_with_the_reason(tiny_model_path):
    from chatrl.models import resolve_model_path
    from chatrl.models.load import load_config

    assert unsupported(load_config(tiny_model_path), "cpu") is None
    why = unsupported(load_config(resolve_model_path("tiny-gpt2")), "cpu")
    assert why is not None and "gpt2" in why
    assert "llama.cpp serves CPU rollouts" in unsupported(load_config(tiny_model_path), "meta")


def test_gathered_weights_sync_as_the_shared_module_does(tiny_model_path, tiny_tokenizer):
    """ZeRO-3's path: `sync_weights(full state dict)` instead of `share(module)`: the same rollout."""
    tok = tiny_tokenizer
    model = _model(tiny_model_path, eos=tok.eos_token_id)
    ids, mask = _prompts()
    params = _params(tok)
    shared = _rollout(LlamaCppBackend(model.config, "cpu", "same"), model, ids, mask, params)
    synced = LlamaCppBackend(model.config, "cpu", "same")
    synced.sync_weights(model.state_dict().items())
    gathered = _rollout(synced, model, ids, mask, params, share=False)
    assert torch.equal(gathered.sequences, shared.sequences)
    assert torch.equal(gathered.logprobs, shared.logprobs)


@pytest.mark.parametrize("kind", ["same", "fp16"])
def test_rollout_records_the_frozen_trunk_for_the_reference_to_replay(tiny_model_path, tiny_tokenizer, kind):
    """With the bottom block frozen, the llama.cpp rollout hands over that block's output at
    every position it forwarded, in the Transformers rollout's layout (TrunkShare.capture_rollout):
    equal to the reference model's full forward there (`same`: to fp32 noise; `fp16`: to its
    rounding), and the reference log-probs replayed from it equal the full forward's. Left-padded
    prompts, rows that stop early, and more rows than one llama.cpp context (split and joined)."""
    from types import SimpleNamespace

    from chatrl.engine.trunk import TrunkShare, frozen_cut, rollout_records_trunk, why_not_shared
    from chatrl.models.freeze import freeze_lower_layers
    from chatrl.steps.ppo import _rollout_states
    from chatrl.steps.stages import response_mask
    from test_trunk import replay_against_reference

    tok = tiny_tokenizer
    actor = _model(tiny_model_path, eos=tok.eos_token_id)
    ref = copy.deepcopy(actor).eval()
    freeze_lower_layers(actor, 1)
    assert why_not_shared(actor, ref) is None and rollout_records_trunk("fp32", kind, "llamacpp")
    share = TrunkShare(frozen_cut(actor), "actor", ref)
    ids, mask = _prompts(7, seed=4)
    P, eos = ids.shape[1], tok.eos_token_id
    hybrid = SimpleNamespace(backend=LlamaCppBackend(actor.config, "cpu", kind))
    hybrid.backend.share(actor)

    def rollout(params, max_seqs=64):
        llamacpp._MAX_SEQS = max_seqs
        try:
            torch.manual_seed(0)
            with share.capture_rollout(hybrid, actor):
                gen = hybrid.backend.generate(ids, mask, params, return_logprobs=True)
        finally:
            llamacpp._MAX_SEQS = 64
        return gen.sequences, share.taken()

    greedy = [rollout(_params(tok, 0.0, n=10), max_seqs) for max_seqs in (64, 3)]
    assert torch.equal(greedy[0][0], greedy[1][0])  # split rows decode in other GEMM shapes:
    torch.testing.assert_close(greedy[1][1], greedy[0][1], atol=1e-5, rtol=1e-4)  # float noise
    seq, states = rollout(_params(tok))
    answer = seq[:, P:]
    act = response_mask(answer, eos)
    assert 0 < (answer == eos).any(1).sum() < len(seq)  # some rows stopped early, some did not
    full_seq = torch.cat([ids, torch.where(act.bool(), answer, torch.zeros_like(answer))], 1)
    full_mask = torch.cat([mask, act.long()], 1)
    states = _rollout_states(states, full_seq)
    direct, ref_lp, replayed_lp = replay_against_reference(share, ref, states, full_seq, full_mask, P)
    forwarded = full_mask.bool().clone()
    forwarded[:, -1] = False  # the last token and each EOS are never forwarded
    forwarded[:, P:] &= answer != eos
    err = (states[forwarded] - direct[forwarded]).norm(dim=-1) / direct[forwarded].norm(dim=-1)
    assert err.max() < (1e-5 if kind == "same" else 3e-3), err.max()
    assert (states[~forwarded] == 0).all()
    gap = ((replayed_lp - ref_lp) * act).abs().max()
    assert gap < (1e-4 if kind == "same" else 0.02), gap
    assert gap > (0 if kind == "fp16" else -1)  # fp16's rounding shows: the states are llama.cpp's
