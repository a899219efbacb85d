"""`--rollout-weights fp16`: fbgemm fp16 copies of an actor's frozen fp32 Linear weights, used by
decode steps."""

import pytest
import torch

from chatrl.engine.rollout_weights import Fp16RolloutWeights, fp16_kernel_available

pytestmark = pytest.mark.skipif(not fp16_kernel_available(), reason="fbgemm is x86-only")


def _model(frozen=(0, 2)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False))
    for i in frozen:
        model[i].requires_grad_(False)
    return model


def _reference(model, x, fp16=(0, 2)):
    """The network with the Linear weights of `fp16` rounded to fp16, computed in fp32."""
    def w(i):
        return model[i].weight.half().float() if i in fp16 else model[i].weight
    h = torch.nn.functional.gelu(x @ w(0).T + model[0].bias)  # the bias stays fp32
    return h @ w(2).T


def test_small_inputs_use_fp16_weights_large_ones_and_outside_the_exact_fp32_ones():
    model, rw = _model(), Fp16RolloutWeights(max_rows=8)
    small, large = torch.randn(2, 3, 64), torch.randn(4, 9, 64)  # 6 and 36 rows
    exact_small, exact_large = model(small), model(large)
    with torch.no_grad(), rw.applied(model):
        got_small, got_large = model(small), model(large)
    assert rw.repacked == 2
    assert not torch.equal(got_small, exact_small)  # the weights were rounded ...
    torch.testing.assert_close(got_small, _reference(model, small), rtol=1e-5, atol=1e-6)  # ... to fp16
    assert torch.equal(got_large, exact_large)  # prefill-sized inputs keep the fp32 weights
    assert all("forward" not in m.__dict__ for m in model)  # restored
    assert torch.equal(model(small), exact_small)


def test_frozen_weights_are_packed_once_trained_ones_stay_fp32():
    model, rw = _model(frozen=(0,)), Fp16RolloutWeights()
    x = torch.randn(4, 64)
    opt = torch.optim.AdamW(model[2].parameters(), lr=0.1, fused=True)
    for first in (True, False, False):  # rollout, update, rollout, update, rollout
        with torch.no_grad(), rw.applied(model):
            got = model(x)
        assert rw.repacked == (1 if first else 0)
        # the trained layer computes with its current fp32 weights, never a stale copy
        torch.testing.assert_close(got, _reference(model, x, fp16=(0,)), rtol=1e-5, atol=1e-6)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    model[2].requires_grad_(False)  # frozen from now on: it gets its copy
    with torch.no_grad(), rw.applied(model):
        got = model(x)
    assert rw.repacked == 1
    torch.testing.assert_close(got, _reference(model, x), rtol=1e-5, atol=1e-6)


def test_non_fp32_weights_are_left_alone():
    model, rw = _model().to(torch.bfloat16), Fp16RolloutWeights()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad(), rw.applied(model):
        got = model(x)
    assert rw.repacked == 0 and torch.equal(got, model(x))


def test_unmerged_lora_base_layers_use_their_copies_and_the_adapters_fp32():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(frozen=()), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    rw = Fp16RolloutWeights()
    x = torch.randn(4, 64)
    for first in (True, False):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.01)  # an update of the adapters only
            exact = model(x)
        with torch.no_grad(), rw.applied(model):
            got = model(x)
        assert rw.repacked == (2 if first else 0)  # the 2 frozen base layers, once
        assert not torch.equal(got, exact)
        torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-3)  # within fp16 weight rounding
