"""EMA of weights and running moments, against hand values."""

import math

import pytest
import torch

from chatrl.rl import RunningMoments, ema_update


def test_ema_update_hand_values():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.tensor([3.0, 0.0]), torch.tensor([[1.0]])]
    ema_update(ema, params, beta=0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2 ; 0.9 * 2 + 0.1 * 0 = 1.8
    torch.testing.assert_close(ema[0], torch.tensor([1.2, 1.8]))
    torch.testing.assert_close(ema[1], torch.tensor([[0.1]]))
    # default beta 0.992: 0.992 * 0 + 0.008 * 1 = 0.008
    e = [torch.zeros(1)]
    ema_update(e, [torch.ones(1)])
    assert e[0].item() == pytest.approx(0.008, abs=1e-7)


def test_ema_update_parameters_dtypes_and_buffers():
    src = torch.nn.Linear(2, 1)
    ema = torch.nn.Linear(2, 1)
    with torch.no_grad():
        src.weight.fill_(1.0)
        src.bias.fill_(-1.0)
        ema.weight.zero_()
        ema.bias.zero_()
    ema_update(ema.parameters(), src.parameters(), beta=0.5)  # Parameters with requires_grad: no error
    torch.testing.assert_close(ema.weight.detach(), torch.full((1, 2), 0.5))
    torch.testing.assert_close(ema.bias.detach(), torch.full((1,), -0.5))
    assert ema.weight.grad is None
    # the EMA may keep a different precision; integer buffers are copied
    e16 = [torch.zeros(2, dtype=torch.bfloat16), torch.tensor(3)]
    ema_update(e16, [torch.tensor([1.0, 2.0]), torch.tensor(7)], beta=0.5)
    torch.testing.assert_close(e16[0], torch.tensor([0.5, 1.0], dtype=torch.bfloat16))
    assert e16[1].item() == 7


def test_ema_update_mismatches():
    with pytest.raises(ValueError):
        ema_update([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match="shape"):
        ema_update([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="beta"):
        ema_update([torch.zeros(2)], [torch.zeros(2)], beta=1.5)


def test_running_moments_hand_values():
    rm = RunningMoments()
    assert (rm.mean, rm.std) == (0.0, 1.0)
    # batch 1, 2, 3: mean 2, unbiased var ((1 + 0 + 1) / 2) = 1
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    # batch 4, 5: mean 4.5, unbiased var (0.25 + 0.25) / 1 = 0.5
    mean_b, std_b = rm.update(torch.tensor([[4.0], [5.0]]))
    assert (mean_b, std_b) == pytest.approx((4.5, math.sqrt(0.5)))
    # all of 1..5: mean 3, unbiased var (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    assert rm.count == 5
    assert rm.mean == pytest.approx(3.0, abs=1e-12)
    assert rm.var == pytest.approx(2.5, abs=1e-12)
    torch.testing.assert_close(
        rm.normalize(torch.tensor([3.0, 5.5])),
        torch.tensor([0.0, 2.5 / (math.sqrt(2.5) + 1e-8)]),
    )
    resumed = RunningMoments()
    resumed.load_state_dict(rm.state_dict())
    assert (resumed.count, resumed.mean, resumed.var) == (rm.count, rm.mean, rm.var)


def test_running_moments_from_moments_equals_update():
    from chatrl.rl import RunningMoments

    a, b = RunningMoments(), RunningMoments()
    g = torch.Generator().manual_seed(1)
    for n in (5, 1, 7):
        x = torch.randn(n, generator=g, dtype=torch.float64) * 3 + 2
        a.update(x)
        b.update_from_moments(float(n), x.sum().item(), x.square().sum().item())
    assert b.count == a.count and b.mean == pytest.approx(a.mean) and b.std == pytest.approx(a.std)
