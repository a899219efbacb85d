"""The hybrid engine: generation mode under ZeRO-3 on 2 ranks, LoRA merge/unmerge, GQA models.

- 2 DeepSpeed ranks, ZeRO-3, CPU (gloo), launched as a user would (`deepspeed --num_gpus 2
  script.py`): greedy answers and their log-probs equal a 1-rank non-ZeRO run of the same weights
  and prompt batches, with the weights gathered once per rollout (gather_once=True) and per token
  (gather_once=False); tiny-llama (4 heads / 2 kv heads), tiny-qwen2 (1 kv head) and a LoRA actor
  with non-zero adapters (merged into the gathered copy; unmerged, gathered per layer, per token);
  and, with llama-cpp-python installed, tiny-llama with and without LoRA decoded by llama.cpp
  from each rank's converted copy of the gathered weights (--generation-backend llamacpp under
  ZeRO-3). The ranks get different prompts and answer lengths (8 vs 2 new tokens), so one
  finishes first: the run must end (bounded timeout).
- LoRA in generation mode (non-ZeRO): adapters are merged into the weights (W + s * B @ A), the
  merged logits equal the unmerged model's within 1e-5, and on leaving the weights are back and the
  adapters unmerged; the module's training mode is restored.
- GQA models generate in generation mode with the KV cache, and the log-probs returned by the
  generation equal a full no-cache forward's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from chatrl.engine.llamacpp import available as llamacpp_available

from ppo_helpers import (PYTHON, SCRIPTS, deepspeed_launcher, free_port, init_in_process, logs,
                         one_thread, start, kill_group)

SCRIPT = SCRIPTS / "hybrid_generate.py"

needs_two_ranks = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                     reason="needs 2 GPUs (or none: then 2 CPU ranks)")


def _wait(proc, timeout):
    try:
        proc.wait(timeout=timeout)
    except Exception:
        kill_group(proc)
        raise AssertionError(f"no result in {timeout}s: a rank hung?\n{logs(proc)}") from None
    assert proc.returncode == 0, logs(proc)


@pytest.fixture(scope="module")
def zero3_vs_plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid")
    # Both runs at once (each is mostly start-up): the 2-rank ZeRO-3 run and the 1-rank reference.
    two = start([deepspeed_launcher(), "--num_gpus", "2", "--master_port", free_port(), SCRIPT,
                 "--out", tmp / "zero3", "--zero-stage", "3"], tmp, "zero3")
    one = start([PYTHON, SCRIPT, "--out", tmp / "plain", "--zero-stage", "0"], tmp, "plain")
    _wait(one, 240)
    _wait(two, 240)
    ref = json.loads((tmp / "plain" / "rank0.json").read_text())
    ranks = [json.loads((tmp / "zero3" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ref, ranks


@needs_two_ranks
def test_zero3_generation_equals_one_rank(zero3_vs_plain):
    ref, ranks = zero3_vs_plain
    seen = set()
    for rank, res in enumerate(ranks):
        for key, got in res.items():
            variant, mode, batch = key.split("/")
            assert int(batch) == rank  # each rank generated its own batch
            want = ref[f"{variant.removesuffix('@llamacpp')}/once/{batch}"]
            assert got["tokens"] == want["tokens"], key
            err = max(abs(a - b) for ra, rb in zip(got["logprobs"], want["logprobs"]) for a, b in zip(ra, rb))
            assert err < 1e-4, (key, err)
            assert got["training_after"], f"{key}: training mode not restored after generation"
            seen.add((variant, mode))
    want_seen = {("tiny-llama", "once"), ("tiny-llama", "per-token"), ("tiny-qwen2", "once"),
                 ("tiny-llama+lora", "once"), ("tiny-llama+lora", "per-token")}
    if llamacpp_available():  # each rank converted the gathered weights and decoded with llama.cpp
        want_seen |= {("tiny-llama@llamacpp", "once"), ("tiny-llama+lora@llamacpp", "once")}
    assert seen == want_seen
    # the answers are not degenerate (a wrong weight would show), and the ranks' lengths differ
    toks = ranks[0]["tiny-llama/once/0"]["tokens"]
    assert all(len(set(row)) >= 4 for row in toks), toks
    assert [len(r) for r in toks] == [8] * 3
    assert [len(r) for r in ranks[1]["tiny-llama/once/1"]["tokens"]] == [2, 2]
    # LoRA changed the answers (the adapters are non-zero and merged into the gathered copy)
    assert ref["tiny-llama+lora/once/0"]["tokens"] != ref["tiny-llama/once/0"]["tokens"]


# ============================================================================ in-process

@pytest.fixture(scope="module")
def inproc():
    init_in_process()
    with one_thread():
        yield


def _lora_engine(path, tok):
    from chatrl.engine import ds
    from chatrl.models import load_causal_lm
    from chatrl.models.lora import apply_lora

    model = load_causal_lm(path, dtype="fp32", dropout=0.0, tokenizer=tok)
    model = apply_lora(model, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=1))


def test_lora_merged_generation_mode_and_unmerge(inproc, tiny_model_path):
    from chatrl.engine.hybrid import GenerationParams, HybridEngine
    from chatrl.models import load_causal_lm, load_tokenizer
    from chatrl.models.load import model_inputs
    from chatrl.models.lora import lora_layers

    tok = load_tokenizer(tiny_model_path, padding_side="left")
    engine = _lora_engine(tiny_model_path, tok)
    module = engine.module
    hybrid = HybridEngine(engine)
    dev = next(module.parameters()).device
    enc = tok(["Tell me about the ocean.", "Hi"], return_tensors="pt", padding=True).to(dev)
    kw = model_inputs(module, enc["input_ids"], enc["attention_mask"])
    layers = lora_layers(module)
    assert layers and all(not m.merged for m in layers)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    module.train()
    with torch.no_grad():
        module.eval()
        unmerged = module(**kw, use_cache=False).logits
        base = load_causal_lm(tiny_model_path, dtype="fp32", dropout=0.0, tokenizer=tok).eval().to(dev)
        plain = base(**kw, use_cache=False).logits
    module.train()
    # the adapters matter: without them the logits are clearly different
    assert (unmerged - plain).abs().max().item() > 1e-3

    with hybrid.generation_mode() as backend:
        gm = backend.model  # the Hugging Face backend generates with this module
        assert gm is module and not gm.training
        assert all(m.merged for m in layers)
        m0 = layers[0]
        w = m0.base_layer.weight
        name = next(n for n, p in module.named_parameters() if p is w)
        delta = (m0.lora_B["default"].weight @ m0.lora_A["default"].weight) * m0.scaling["default"]
        assert torch.allclose(w, before[name] + delta, atol=1e-6)
        with torch.no_grad():
            merged = gm(**kw, use_cache=False).logits
    err = (merged - unmerged).abs().max().item()
    assert err < 1e-5, f"merged logits differ from unmerged by {err}"
    # left generation mode: unmerged, weights back, training mode back
    assert all(not m.merged for m in layers)
    assert module.training
    for n, p in module.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6, rtol=0), n

    # generate() uses the merged weights; its log-probs are the unmerged model's
    params = GenerationParams(max_new_tokens=6, temperature=1.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, min_new_tokens=6)
    torch.manual_seed(0)
    gen = hybrid.generate(enc["input_ids"], enc["attention_mask"], params, return_logprobs=True)
    assert all(not m.merged for m in layers) and module.training
    full = gen.sequences
    mask = torch.cat([enc["attention_mask"], torch.ones_like(full[:, enc["input_ids"].shape[1]:])], 1)
    module.eval()
    with torch.no_grad():
        logits = module(**model_inputs(module, full, mask), use_cache=False).logits
    module.train()
    P = enc["input_ids"].shape[1]
    lp = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, full[:, P:, None]).squeeze(-1)
    assert (lp - gen.logprobs).abs().max().item() < 1e-4


@pytest.mark.parametrize("only_optimize", [True, False])
def test_lora_generation_mode_leaves_bf16_base_weights_bit_identical(inproc, tiny_model_path,
                                                                     only_optimize):
    """ZeRO 0-2 in bf16: generation mode folds the adapters in and must give the exact base weights
    back. An in-place merge and unmerge, W <- round(round(W + dW) - dW), is not W in bf16 (50
    rollouts changed 22% of the frozen base entries), and with --only-optimize-lora nothing ever
    overwrites the drift."""
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine
    from chatrl.models import load_causal_lm, load_tokenizer
    from chatrl.models.load import model_inputs
    from chatrl.models.lora import apply_lora, lora_layers, merged_state_dict

    tok = load_tokenizer(tiny_model_path, padding_side="left")
    model = load_causal_lm(tiny_model_path, dtype="fp32", dropout=0.0, tokenizer=tok)
    model = apply_lora(model, 4, only_optimize=only_optimize)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # non-zero adapters of a size that changes most merged entries
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, dtype="bf16", micro_batch=1))
    module = engine.module
    module.train()
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    hybrid = HybridEngine(engine)
    dev = next(module.parameters()).device
    enc = tok(["Tell me about the ocean.", "Hi"], return_tensors="pt", padding=True).to(dev)
    params = GenerationParams(max_new_tokens=2, temperature=1.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    kw = model_inputs(module, enc["input_ids"], enc["attention_mask"])
    # generation mode computes with W + s * B @ A (folded in fp32, rounded once to bf16): the same
    # weights the ZeRO-3 inference copy and the saved folder get
    merged = merged_state_dict(module)
    for _ in range(8):
        with hybrid.generation_mode() as backend, torch.no_grad():
            assert all(m.merged for m in lora_layers(module))
            got = backend.model(**kw, use_cache=False).logits
            for n, p in module.named_parameters():
                if n.endswith("base_layer.weight"):
                    assert torch.equal(p, merged[n.replace(".base_layer.", ".")]), n
        hybrid.generate(enc["input_ids"], enc["attention_mask"], params, return_logprobs=True)
    assert torch.isfinite(got).all()
    assert all(not m.merged for m in lora_layers(module)) and module.training
    changed = {n: (p != before[n]).float().mean().item() for n, p in module.named_parameters()
               if not torch.equal(p, before[n])}
    assert not changed, f"generation mode changed the weights (share of entries): {changed}"


# What a model's generation_config.json may hold that would change the rollout policy if it leaked
# into generate(): every one warps or truncates the sampling distribution.
POLLUTED_GENERATION = {"repetition_penalty": 8.0, "no_repeat_ngram_size": 1, "top_k": 2,
                       "typical_p": 0.5, "min_p": 0.2, "temperature": 0.3,
                       "suppress_tokens": list(range(3, 240)), "do_sample": False}


def _polluted_copy(src: str, dst) -> str:
    """The same weights and tokenizer, with a generation_config.json that sets POLLUTED_GENERATION."""
    import shutil
    from pathlib import Path

    shutil.copytree(src, dst)
    f = Path(dst) / "generation_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **POLLUTED_GENERATION}))
    return str(dst)


def test_rollouts_ignore_the_models_generation_config(inproc, tiny_model_path, tmp_path):
    """Rollouts sample from softmax(logits / T) with chatrl's top-p/top-k only: a model's own
    generation_config.json (repetition penalty, n-gram bans, suppressed tokens...) would make the
    samples come from another policy than the log-probs PPO trains on. The same seed must give the
    same samples with and without such a file, through the shared module (ZeRO 0-2) and through the
    inference copy (the ZeRO-3 / vLLM-style path); greedy answers are the forward pass's argmax."""
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HFBackend, HybridEngine
    from chatrl.models import load_causal_lm, load_tokenizer
    from chatrl.models.load import model_inputs

    polluted = _polluted_copy(tiny_model_path, tmp_path / "polluted")
    tok = load_tokenizer(tiny_model_path, padding_side="left")
    enc = tok(["Tell me about the ocean.", "Hi"], return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]
    sample = GenerationParams(max_new_tokens=12, temperature=1.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, min_new_tokens=12)
    greedy = dataclasses.replace(sample, temperature=0.0)

    def rollouts(path):
        model = load_causal_lm(path, dtype="fp32", dropout=0.0, tokenizer=tok)
        if path == polluted:
            assert model.generation_config.repetition_penalty == 8.0  # the file is read
        engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=1))
        hybrid = HybridEngine(engine)
        copy = HFBackend(engine.module.config, torch.device("cpu"))
        copy.sync_weights(engine.module.state_dict().items())
        out = {}
        for name, params in (("sample", sample), ("greedy", greedy)):
            torch.manual_seed(0)
            out[f"shared/{name}"] = hybrid.generate(enc["input_ids"], enc["attention_mask"], params,
                                                    return_logprobs=True)
            torch.manual_seed(0)
            out[f"copy/{name}"] = copy.generate(enc["input_ids"], enc["attention_mask"], params,
                                                return_logprobs=True)
        return engine.module, out

    module, clean = rollouts(tiny_model_path)
    _, dirty = rollouts(polluted)
    for key in clean:
        assert torch.equal(dirty[key].sequences, clean[key].sequences), \
            f"{key}: the model's generation_config.json changed the rollout"
        assert torch.equal(dirty[key].logprobs, clean[key].logprobs), key
    # the clean rollouts are the policy's: greedy tokens are the argmax of a forward pass, and the
    # sampled answers use tokens the polluted config would have banned or penalised
    seq = clean["shared/greedy"].sequences
    mask = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, P:])], 1)
    module.eval()
    with torch.no_grad():
        logits = module(**model_inputs(module, seq, mask), use_cache=False).logits
    assert torch.equal(logits[:, P - 1:-1].argmax(-1), seq[:, P:])
    sampled = clean["shared/sample"].sequences[:, P:]
    assert ((sampled >= 3) & (sampled < 240)).any()


def test_rollout_logprobs_equal_a_full_forward_without_keeping_every_steps_logits(inproc, tiny_model_path,
                                                                                  monkeypatch):
    """The log-prob of each sampled token under softmax(fp32 logits / T) is gathered step by step;
    generate() is not asked to keep every step's logits (a [batch, new, vocab] fp32 tensor, several
    GB at a 128k vocabulary). Equal to one full forward's within fp32 round-off, with top-p and
    min_new_tokens acting on the sampling only."""
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine
    from chatrl.models import load_causal_lm, load_tokenizer
    from chatrl.models.load import model_inputs

    tok = load_tokenizer(tiny_model_path, padding_side="left")
    model = load_causal_lm(tiny_model_path, dtype="fp32", dropout=0.0, tokenizer=tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # sharp random weights: peaked distributions, where top-p truncates
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=1))
    module = engine.module
    hybrid = HybridEngine(engine)
    asked = []
    real = module.generate

    def spy(*a, **k):
        asked.append(k)
        return real(*a, **k)

    monkeypatch.setattr(module, "generate", spy)
    enc = tok(["Describe a mountain in the morning sun.", "Hi", "What do you think of rain?"],
              return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
        params = GenerationParams(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  min_new_tokens=10)
        torch.manual_seed(0)
        gen = hybrid.generate(enc["input_ids"], enc["attention_mask"], params, return_logprobs=True)
        assert gen.logprobs.shape == (3, 10) and gen.logprobs.dtype == torch.float32
        mask = torch.cat([enc["attention_mask"], torch.ones(3, 10, dtype=torch.long)], 1)
        module.eval()
        with torch.no_grad():
            logits = module(**model_inputs(module, gen.sequences, mask), use_cache=False).logits
        want = torch.log_softmax(logits[:, P - 1:-1].float() / temperature, -1)
        want = want.gather(-1, gen.sequences[:, P:, None]).squeeze(-1)
        err = (want - gen.logprobs).abs().max().item()
        assert err < 1e-5, (temperature, err)
        assert want.min() < -1.0  # not a trivially certain policy
        # the per-token entropy of the rollout log: the same distribution's, before top-p
        from chatrl.rl.logprobs import entropy_from_logits

        want_h = entropy_from_logits(logits[:, P - 1:-1], temperature=temperature)
        assert gen.entropy.shape == (3, 10)
        assert (want_h - gen.entropy).abs().max().item() < 1e-4 and want_h.max() > 0.5
    assert asked and not any(k.get("output_logits") or k.get("output_scores") for k in asked), asked


@pytest.mark.parametrize("arch,kv_heads", [("tiny-llama", 2), ("tiny-qwen2", 1)])
def test_gqa_generation_mode(inproc, arch, kv_heads):
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine
    from chatrl.models import load_causal_lm, load_tokenizer, resolve_model_path
    from chatrl.models.load import model_inputs

    path = resolve_model_path(arch)
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype="fp32", dropout=0.0, tokenizer=tok)
    cfg = model.config
    assert cfg.num_key_value_heads == kv_heads < cfg.num_attention_heads == 4
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # sharp random weights: varied answers (see scripts/hybrid_generate.py)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=1))
    hybrid = HybridEngine(engine)
    dev = next(engine.module.parameters()).device
    enc = tok(["Describe a mountain in the morning sun.", "Hi"], return_tensors="pt", padding=True).to(dev)
    P = enc["input_ids"].shape[1]
    params = GenerationParams(max_new_tokens=10, temperature=1.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, min_new_tokens=10)
    torch.manual_seed(0)
    gen = hybrid.generate(enc["input_ids"], enc["attention_mask"], params, return_logprobs=True)
    assert gen.sequences.shape == (2, P + 10) and gen.logprobs.shape == (2, 10)
    assert torch.equal(gen.sequences[:, :P], enc["input_ids"])
    # the KV-cached GQA decode agrees with one full forward over prompt + answer
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 10, dtype=torch.long, device=dev)], 1)
    with torch.no_grad():
        logits = engine.module(**model_inputs(engine.module, gen.sequences, mask), use_cache=False).logits
    lp = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, gen.sequences[:, P:, None]).squeeze(-1)
    assert (lp - gen.logprobs).abs().max().item() < 1e-4
    assert len(set(gen.sequences[0, P:].tolist())) >= 4
