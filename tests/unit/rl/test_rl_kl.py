"""KL estimators, KL-shaped rewards and the KL controllers, against hand values."""

import math

import pytest
import torch

from chatrl.rl import AdaptiveKLController, FixedKLController, kl_penalty, kl_shaped_rewards

LOGP = torch.tensor([[-1.0, -2.0, -1.0]])
REF = torch.tensor([[-1.5, -1.0, -1.0]])
# d = logp - ref = [0.5, -1.0, 0.0]


def test_kl_estimators_hand_values():
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    # 0.5 * d^2
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))
    # exp(ref - logp) - (ref - logp) - 1: exp(-0.5) + 0.5 - 1 ; exp(1) - 1 - 1 ; 1 - 0 - 1
    k3 = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k3"), k3, atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_penalty(LOGP, REF, "abs"), torch.tensor([[0.5, 1.0, 0.0]]))
    assert (kl_penalty(LOGP, REF, "k3") >= 0).all()


def test_kl_default_is_k1_and_unknown_estimator_is_rejected():
    torch.testing.assert_close(kl_penalty(LOGP, REF), LOGP - REF)
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(LOGP, REF, "k4")


def _rollout():
    logprobs = torch.tensor(
        [
            [-1.0, -1.0, -1.0, -1.0],  # EOS at t=2, t=3 is padding
            [-2.0, -2.0, -2.0, -2.0],  # truncated (no EOS): all 4 count
            [-1.0, -9.0, -9.0, -9.0],  # immediate EOS at t=0
        ]
    )
    ref_logprobs = torch.tensor(
        [
            [-1.5, -0.5, -1.0, -3.0],  # d = [0.5, -0.5, 0, 2 (masked)]
            [-2.0, -1.0, -3.0, -2.0],  # d = [0, -1, 1, 0]
            [-2.0, 0.0, 0.0, 0.0],  # d = [1, masked...]
        ]
    )
    mask = torch.tensor([[1.0, 1, 1, 0], [1.0, 1, 1, 1], [1.0, 0, 0, 0]])
    scores = torch.tensor([7.0, -3.0, -9.0])
    return logprobs, ref_logprobs, scores, mask


def test_kl_shaped_rewards_score_at_eos_clipped_and_zero_after():
    logprobs, ref, scores, mask = _rollout()
    rewards = kl_shaped_rewards(logprobs, ref, scores, mask, kl_coef=0.1, clip_reward=5.0)
    expected = torch.tensor(
        [
            # -0.1 * [0.5, -0.5, 0] ; + clip(7, -5, 5) = 5 at the EOS (t=2) ; 0 after EOS
            [-0.05, 0.05, 0.0 + 5.0, 0.0],
            # -0.1 * [0, -1, 1, 0] ; + clip(-3) = -3 at the last token (truncated)
            [0.0, 0.1, -0.1, 0.0 - 3.0],
            # -0.1 * 1 + clip(-9) = -0.1 - 5 ; nothing after
            [-5.1, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0)


def test_kl_shaped_rewards_defaults_no_clip_and_k3():
    logprobs, ref, scores, mask = _rollout()
    # defaults are kl_coef 0.1, clip_reward 5, k1
    torch.testing.assert_close(
        kl_shaped_rewards(logprobs, ref, scores, mask),
        kl_shaped_rewards(logprobs, ref, scores, mask, kl_coef=0.1, clip_reward=5.0, estimator="k1"),
    )
    unclipped = kl_shaped_rewards(logprobs, ref, scores, mask, clip_reward=None)
    assert unclipped[0, 2].item() == pytest.approx(7.0, abs=1e-6)
    assert unclipped[2, 0].item() == pytest.approx(-9.1, abs=1e-6)
    k3 = kl_shaped_rewards(logprobs, ref, scores, mask, kl_coef=0.5, estimator="k3")
    # row 1: d = [0, -1, 1, 0] -> k3 = [0, e - 2, exp(-1) + 1 - 1, 0], times -0.5; -3 at the end
    expected_row1 = torch.tensor([0.0, -0.5 * (math.e - 2), -0.5 * math.exp(-1), -3.0])
    torch.testing.assert_close(k3[1], expected_row1, atol=1e-6, rtol=0)


def test_kl_shaped_rewards_empty_row_gets_nothing_and_no_grad():
    logprobs, ref, scores, mask = _rollout()
    mask[2] = 0.0
    logprobs.requires_grad_(True)
    rewards = kl_shaped_rewards(logprobs, ref, scores, mask)
    assert not rewards.requires_grad
    assert rewards[2].abs().max().item() == 0.0


def test_fixed_kl_controller():
    ctl = FixedKLController(0.1)
    assert ctl.update(123.0, 64) == 0.1
    assert ctl.value == 0.1
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.1


def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5 -> clipped to 0.2 ; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512, abs=1e-12)
    # KL 5.4: 5.4/6 - 1 = -0.1 ; mult = 1 - 0.1 * 1000 / 10000 = 0.99
    assert ctl.update(torch.tensor(5.4, dtype=torch.float64), 1000) == pytest.approx(0.1 * 1.00512 * 0.99, abs=1e-12)
    # KL 0: -1 -> clipped to -0.2 ; mult = 1 - 0.2 * 5000 / 10000 = 0.9
    ctl.update(0.0, 5000)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99 * 0.9, abs=1e-12)  # 0.089556192
    assert ctl.value == pytest.approx(0.089556192, abs=1e-12)
    resumed = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(ctl.state_dict())
    assert (resumed.value, resumed.target, resumed.horizon) == (ctl.value, 6.0, 10000.0)


def test_kl_controllers_reject_bad_settings():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
