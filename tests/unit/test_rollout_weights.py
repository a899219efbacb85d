"""`--rollout-weights fp16`: fbgemm fp16 copies of fp32 Linear weights for decode steps."""

import pytest
import torch

from chatrl.engine.rollout_weights import Fp16RolloutWeights, fp16_kernel_available

pytestmark = pytest.mark.skipif(not fp16_kernel_available(), reason="fbgemm is x86-only")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False))


def _fp16_reference(model, x):
    """The same network with its Linear weights rounded to fp16 and computed in fp32."""
    w0, b0, w2 = model[0].weight, model[0].bias, model[2].weight
    h = torch.nn.functional.gelu(x @ w0.half().float().T + b0)  # the bias stays fp32
    return h @ w2.half().float().T


def test_small_inputs_use_fp16_weights_large_ones_and_outside_the_exact_fp32_ones():
    model, rw = _model(), Fp16RolloutWeights(max_rows=8)
    small, large = torch.randn(2, 3, 64), torch.randn(4, 9, 64)  # 6 and 36 rows
    exact_small, exact_large = model(small), model(large)
    with torch.no_grad(), rw.applied(model):
        got_small, got_large = model(small), model(large)
    assert rw.repacked == 2
    assert not torch.equal(got_small, exact_small)  # the weights were rounded ...
    torch.testing.assert_close(got_small, _fp16_reference(model, small), rtol=1e-5, atol=1e-6)  # ... to fp16
    assert torch.equal(got_large, exact_large)  # prefill-sized inputs keep the fp32 weights
    assert all("forward" not in m.__dict__ for m in model)  # restored
    assert torch.equal(model(small), exact_small)


def test_trained_weights_are_packed_again_frozen_ones_kept():
    model, rw = _model(), Fp16RolloutWeights()
    model[0].requires_grad_(False)  # frozen
    x = torch.randn(4, 64)
    with torch.no_grad(), rw.applied(model):
        model(x)
    assert rw.repacked == 2
    opt = torch.optim.AdamW(model[2].parameters(), lr=0.1, fused=True)
    for _ in range(2):  # an optimizer step, then a rollout: the trained weight is packed again
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad(), rw.applied(model):
            got = model(x)
        assert rw.repacked == 1
        torch.testing.assert_close(got, _fp16_reference(model, x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model[0].weight.data.add_(0.5)  # a write the version counter never sees (`.data`) ...
        model[0].weight.add_(0.0)  # ... and one it does: a frozen weight changed in place is packed again
    with torch.no_grad(), rw.applied(model):
        got = model(x)
    assert rw.repacked == 2
    torch.testing.assert_close(got, _fp16_reference(model, x), rtol=1e-5, atol=1e-6)


def test_non_fp32_weights_are_left_alone():
    model, rw = _model().to(torch.bfloat16), Fp16RolloutWeights()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad(), rw.applied(model):
        got = model(x)
    assert rw.repacked == 0 and torch.equal(got, model(x))
