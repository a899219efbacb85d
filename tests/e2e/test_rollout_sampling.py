"""Rollout sampling draws from exactly the policy PPO trains on.

chatrl samples rollouts with its own last logits processor (`InverseCDFSampler`, one uniform per
row against the cumulative sum) instead of Transformers' `torch.multinomial`, which is several
times slower on CPU. These tests hold the drawn tokens' frequencies against softmax(logits / T)
truncated by top-k / top-p, computed here independently from a full forward, through the real
`HybridEngine.generate` path.
"""

import math

import pytest
import torch

from ppo_helpers import init_in_process, one_thread

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def inproc():
    init_in_process()
    with one_thread():
        yield


def _sharp_tiny(tiny_model_path):
    from chatrl.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_path, padding_side="left")
    model = load_causal_lm(tiny_model_path, dtype="fp32", dropout=0.0, tokenizer=tok)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # peaked enough that top-p / top-k cut real mass
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tok, model.eval()


def _expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T), keeping the k largest, then the smallest set of largest
    probabilities whose mass reaches top_p (ties at the boundary kept), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        keep[i] = True
        mass += p[i].item()
        if mass >= top_p - 1e-12:
            break
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 8, 1.0)])
def test_sampled_first_tokens_follow_the_truncated_softmax(inproc, tiny_model_path, temperature,
                                                           top_k, top_p):
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine

    tok, model = _sharp_tiny(tiny_model_path)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=1))
    hybrid = HybridEngine(engine)
    enc = tok(["Tell me about the sea."], return_tensors="pt")
    n = 6000
    ids, mask = enc["input_ids"].repeat(n, 1), enc["attention_mask"].repeat(n, 1)
    params = GenerationParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(11)
    gen = hybrid.generate(ids, mask, params, return_logprobs=True)
    drawn = gen.sequences[:, -1]
    with torch.no_grad():
        logits = engine.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, -1]
    want = _expected(logits, temperature, top_k, top_p)
    counts = torch.bincount(drawn, minlength=want.numel()).double()
    # never a token outside the truncated support
    assert counts[want == 0].sum() == 0, "drew a token that top-k / top-p removed"
    # frequencies within 4.5 standard errors of the probabilities, for every token
    freq = counts / n
    se = (want * (1 - want) / n).sqrt().clamp(min=1e-9)
    z = ((freq - want) / se)[want > 0]
    assert z.abs().max() < 4.5, (z.abs().max().item(), int((want > 0).sum()))
    # and a chi-square over the tokens expected 5+ times (the rest pooled) within its 99.9% range
    big = want * n >= 5
    obs = torch.cat([counts[big], counts[~big & (want > 0)].sum().view(1)])
    exp = torch.cat([want[big] * n, (want[~big & (want > 0)].sum() * n).view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    dof = obs.numel() - 1
    assert dof >= 3, "the test distribution is too peaked to test anything"
    assert chi2 < dof + 3.1 * math.sqrt(2 * dof) + 10, (chi2, dof)
    # the recorded log-prob is the untruncated policy's, as the training forward computes it
    full = torch.log_softmax(logits.float() / temperature, -1)
    assert torch.allclose(gen.logprobs[:, 0], full[drawn], atol=1e-5)


def test_same_seed_same_samples_and_greedy_is_argmax(inproc, tiny_model_path):
    from chatrl.engine import ds
    from chatrl.engine.hybrid import GenerationParams, HybridEngine

    tok, model = _sharp_tiny(tiny_model_path)
    engine = ds.build_engine(model, ds.EngineSpec(zero_stage=0, micro_batch=1))
    hybrid = HybridEngine(engine)
    enc = tok(["Hi", "What do you think of rain?"], return_tensors="pt", padding=True)
    params = GenerationParams(max_new_tokens=12, temperature=1.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(hybrid.generate(enc["input_ids"], enc["attention_mask"], params).sequences)
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(6)
    other = hybrid.generate(enc["input_ids"], enc["attention_mask"], params).sequences
    assert not torch.equal(runs[0], other)
    greedy = GenerationParams(max_new_tokens=12, temperature=0.0, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    got = hybrid.generate(enc["input_ids"], enc["attention_mask"], greedy).sequences
    with torch.no_grad():
        want = engine.module.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                      do_sample=False, max_new_tokens=12, min_length=0,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, want)
