"""Critic-free advantage estimators, dynamic sampling, the over-long penalty, pass@k and the
algorithm presets, against hand-computed values."""

import math

import pytest
import torch

from chatrl.rl import (ALGORITHMS, discounted_returns, group_advantages, informative_groups,
                       kl_penalized_scores, overlong_penalty, pass_at_k, resolve_algorithm,
                       rloo_advantages, sequence_to_tokens)


def test_grpo_group_advantages_with_std():
    # group 1: [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735
    # group 2: [3, 3, 3, 3]: all equal -> 0 everywhere
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    adv = group_advantages(scores, 4, scale_by_std=True, eps=0.0 + 1e-4)
    s = math.sqrt(1 / 3) + 1e-4
    want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, abs=1e-6)


def test_grpo_group_advantages_without_std_is_dr_grpo():
    # [2, 4, 9]: mean 5 -> [-3, -1, 4]; [1, 1, 1] -> 0
    adv = group_advantages(torch.tensor([2.0, 4.0, 9.0, 1.0, 1.0, 1.0]), 3, scale_by_std=False)
    assert adv.tolist() == pytest.approx([-3.0, -1.0, 4.0, 0.0, 0.0, 0.0], abs=1e-6)


def test_grpo_all_equal_group_is_exactly_zero_even_with_std():
    adv = group_advantages(torch.tensor([0.7, 0.7]), 2)
    assert adv.tolist() == [0.0, 0.0]


def test_rloo_leave_one_out_baseline():
    # [2, 4, 9]: baselines (4+9)/2 = 6.5, (2+9)/2 = 5.5, (2+4)/2 = 3 -> [-4.5, -1.5, 6]
    # equals G/(G-1) * (r - mean) = 1.5 * [-3, -1, 4]
    adv = rloo_advantages(torch.tensor([2.0, 4.0, 9.0, 5.0, 5.0, 5.0]), 3)
    assert adv.tolist() == pytest.approx([-4.5, -1.5, 6.0, 0.0, 0.0, 0.0], abs=1e-6)
    # G = 2: each answer against the other
    assert rloo_advantages(torch.tensor([1.0, 0.0]), 2).tolist() == [1.0, -1.0]


def test_group_estimators_need_two_answers_and_whole_groups():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_discounted_returns_reinforce_pp():
    # row 0: rewards [-0.1, -0.2, 1.0] all masked, gamma 0.5:
    #   G2 = 1.0, G1 = -0.2 + 0.5 * 1.0 = 0.3, G0 = -0.1 + 0.5 * 0.3 = 0.05
    # row 1: mask [1, 1, 0] (the EOS at t=1), garbage after it must not leak:
    #   G1 = 2.0, G0 = 1.0 + 0.5 * 2.0 = 2.0, G2 = 0
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [1.0, 2.0, float("nan")]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    out = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.05, 0.3, 1.0], [2.0, 2.0, 0.0]]))
    # gamma 1: the reward-to-go
    out1 = discounted_returns(rewards, mask, gamma=1.0)
    torch.testing.assert_close(out1, torch.tensor([[0.7, 0.8, 1.0], [3.0, 2.0, 0.0]]))


def test_sequence_to_tokens_and_kl_in_the_reward():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    toks = sequence_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert toks.tolist() == [[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]]
    # r = score - 0.5 * (sum of masked KL): row 0: 1 - 0.5 * (0.2 + 0.4) = 0.7 (0.9 masked out)
    kl = torch.tensor([[0.2, 0.4, 0.9], [1.0, -1.0, 2.0]])
    got = kl_penalized_scores(torch.tensor([1.0, 0.0]), kl, mask, 0.5)
    assert got.tolist() == pytest.approx([0.7, -1.0], abs=1e-6)


def test_informative_groups_for_dynamic_sampling():
    scores = torch.tensor([1.0, 1.0, 1.0,   0.0, 1.0, 0.0,   0.0, 0.0, 0.0,   0.5, 0.5, 0.5001])
    keep = informative_groups(scores, 3)
    assert keep.tolist() == [False, True, False, True]
    # a tolerance treats near-equal scores as equal
    assert informative_groups(scores, 3, tol=1e-3).tolist() == [False, True, False, False]


def test_overlong_penalty_ramp():
    # max 20, buffer 8: free up to 12, then -(L - 12) / 8, -1 beyond 20
    lengths = torch.tensor([5, 12, 13, 16, 20, 25])
    got = overlong_penalty(lengths, max_len=20, buffer=8)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.5, -1.0, -1.0], abs=1e-6)
    assert overlong_penalty(lengths, 20, 8, coef=2.0).tolist()[3] == pytest.approx(-1.0)
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 6


def test_pass_at_k():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_algorithm_presets_are_their_published_choices():
    assert ALGORITHMS["ppo"].uses_critic and ALGORITHMS["ppo"].kl_in_reward
    g = resolve_algorithm("grpo")
    assert (g.estimator, g.scale_std, g.aggregation, g.kl_placement) == \
        ("grpo", True, "seq_mean_token_mean", "loss")
    assert not g.uses_critic and not g.kl_in_loss  # kl_coef 0 by default: no reference needed
    d = resolve_algorithm("dr_grpo")
    assert (d.scale_std, d.aggregation) == (False, "seq_mean_token_sum_norm")
    dapo = resolve_algorithm("dapo", max_answer_len=48)
    assert (dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling, dapo.overlong_buffer,
            dapo.aggregation) == (0.2, 0.28, True, 12, "token_mean")
    assert resolve_algorithm("gspo").ratio_level == "sequence"
    assert resolve_algorithm("rloo").estimator == "rloo"
    rpp = resolve_algorithm("reinforce_pp")
    assert rpp.whiten and rpp.kl_in_reward and rpp.estimator == "reinforce_pp"
    # overrides win; None means "the preset's"
    o = resolve_algorithm("grpo", kl_coef=0.04, clip_high=None, num_generations=4)
    assert o.kl_coef == 0.04 and o.kl_in_loss and o.clip_high == 0.2 and o.num_generations == 4
    with pytest.raises(ValueError, match="num_generations >= 2"):
        resolve_algorithm("grpo", num_generations=1)
    with pytest.raises(ValueError, match="unknown algorithm"):
        resolve_algorithm("a2c")
