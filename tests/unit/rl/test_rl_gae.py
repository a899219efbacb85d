"""GAE against the recursion written out by hand."""

import pytest
import torch

from chatrl.rl import gae_advantages

R = torch.tensor([[0.1, -0.2, 1.0]])
V = torch.tensor([[0.5, 0.4, 0.3]])
FULL = torch.ones(1, 3)


def test_gae_three_tokens_gamma1_lambda095():
    adv, ret = gae_advantages(R, V, FULL, gamma=1.0, lam=0.95)
    # t=2: delta = 1.0 + 0 - 0.3 = 0.7                   A2 = 0.7
    # t=1: delta = -0.2 + 0.3 - 0.4 = -0.3               A1 = -0.3 + 0.95 * 0.7 = 0.365
    # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0                 A0 = 0.0 + 0.95 * 0.365 = 0.34675
    torch.testing.assert_close(adv, torch.tensor([[0.34675, 0.365, 0.7]]), atol=1e-6, rtol=0)
    # returns = A + V
    torch.testing.assert_close(ret, torch.tensor([[0.84675, 0.765, 1.0]]), atol=1e-6, rtol=0)


def test_gae_defaults_are_gamma1_lambda095():
    a1, r1 = gae_advantages(R, V, FULL)
    a2, r2 = gae_advantages(R, V, FULL, gamma=1.0, lam=0.95)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_gae_other_gamma_lambda():
    adv, ret = gae_advantages(R, V, FULL, gamma=0.9, lam=0.5)
    # t=2: delta = 1.0 - 0.3 = 0.7                        A2 = 0.7
    # t=1: delta = -0.2 + 0.9*0.3 - 0.4 = -0.33           A1 = -0.33 + 0.45*0.7 = -0.015
    # t=0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04            A0 = -0.04 + 0.45*(-0.015) = -0.04675
    torch.testing.assert_close(adv, torch.tensor([[-0.04675, -0.015, 0.7]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.45325, 0.385, 1.0]]), atol=1e-6, rtol=0)


def test_gae_lambda1_gamma1_returns_are_reward_to_go():
    _, ret = gae_advantages(R, V, FULL, gamma=1.0, lam=1.0)
    # 0.1 - 0.2 + 1.0 = 0.9 ; -0.2 + 1.0 = 0.8 ; 1.0
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.8, 1.0]]), atol=1e-6, rtol=0)


def test_gae_mask_ending_early_is_terminal():
    rewards = torch.tensor([[0.1, 2.0, 9.0, 9.0]])  # garbage after the EOS at t=1
    values = torch.tensor([[0.5, 0.4, 7.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=1 (EOS): V_2 and A_2 are 0 -> delta = 2.0 - 0.4 = 1.6, A1 = 1.6
    # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0, A0 = 0.95 * 1.6 = 1.52
    torch.testing.assert_close(adv, torch.tensor([[1.52, 1.6, 0.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[2.02, 2.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_gae_is_vectorised_over_the_batch():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.1, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.0], [0.5, 0.4, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1.0, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask)
    # row 0 is the 3-token example, row 1 the early-ending one, padded to 4
    expected_adv = torch.tensor([[0.34675, 0.365, 0.7, 0.0], [1.52, 1.6, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.84675, 0.765, 1.0, 0.0], [2.02, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, expected_ret, atol=1e-6, rtol=0)


def test_gae_outputs_are_detached_targets():
    values = V.clone().requires_grad_(True)
    adv, ret = gae_advantages(R, values, FULL)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        gae_advantages(R, V[:, :2], FULL)
