"""PPO actor/critic losses, pairwise (two forms) and DPO, against hand values."""

import math

import pytest
import torch

from chatrl.rl import dpo_loss, dschat_pairwise_loss, pairwise_loss, policy_loss, value_loss


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)"""
    return math.log1p(math.exp(x))


def test_policy_loss_with_clipping_active():
    ratios = [1.5, 0.5, 1.5, 0.5, 1.0, 1.0]
    old = torch.tensor([[-1.0, -2.0, -1.0, -2.0, -3.0, -1.0]])
    logprobs = (old + torch.log(torch.tensor([ratios]))).clone()
    logprobs[0, 5] = float("-inf")  # padding garbage
    logprobs.requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 0.5, 100.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # token: -A*ratio, -A*clip(ratio, 0.8, 1.2) -> max
    # a: ratio 1.5, A=+1: -1.5, -1.2 -> -1.2 (clipped)
    # b: ratio 0.5, A=+1: -0.5, -0.8 -> -0.5
    # c: ratio 1.5, A=-2:  3.0,  2.4 ->  3.0
    # d: ratio 0.5, A=-2:  1.0,  1.6 ->  1.6 (clipped)
    # e: ratio 1.0, A=.5: -0.5, -0.5 -> -0.5 (tie: not counted as clipped)
    # mean over the 5 masked tokens: (-1.2 - 0.5 + 3.0 + 1.6 - 0.5) / 5 = 0.48
    assert loss.item() == pytest.approx(0.48, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5, abs=1e-6)
    # 0.5 * log(ratio)^2: two tokens at ln 1.5, two at ln 0.5, one at 0
    approx_kl = (math.log(1.5) ** 2 + math.log(2.0) ** 2) / 5
    assert stats["approx_kl"].item() == pytest.approx(approx_kl, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.0) / 5, abs=1e-6)
    loss.backward()
    # d/dlogp of -A*ratio is -A*ratio, / 5 tokens; zero where the clipped branch is chosen
    expected_grad = torch.tensor([[0.0, -0.5 / 5, 3.0 / 5, 0.0, -0.5 / 5, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-6, rtol=0)
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_no_clip_when_ratio_is_one():
    lp = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[2.0, -1.0]])
    loss, stats = policy_loss(lp, lp, adv, torch.ones(1, 2))
    # ratio 1: loss = mean(-A) = (-2 + 1) / 2
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_policy_loss_token_level_mean_across_rows():
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1.0, 0, 0], [1.0, 1, 1]])
    loss, _ = policy_loss(lp, lp, adv, mask)
    # token-level: -(1 + 4 + 4 + 4) / 4 = -3.25 (a per-row mean would give -2.5)
    assert loss.item() == pytest.approx(-3.25, abs=1e-6)


def test_value_loss_with_clipping_active():
    values = torch.tensor([[1.0, 0.6, 0.0, -1.0, 50.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, -0.9, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token: V_clip = clip(V, V_old - .2, V_old + .2); (V-R)^2, (V_clip-R)^2 -> max
    # 1: V=1.0, clip 0.7:  0.00, 0.09 -> 0.09 (clipped)
    # 2: V=0.6, clip 0.6:  0.36, 0.36 -> 0.36
    # 3: V=0.0, clip 0.3:  1.00, 0.49 -> 1.00
    # 4: V=-1., clip -0.2: 0.01, 0.49 -> 0.49 (clipped)
    # 0.5 * (0.09 + 0.36 + 1.0 + 0.49) / 4 = 0.2425
    assert loss.item() == pytest.approx(0.2425, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5, abs=1e-6)
    loss.backward()
    # grad of 0.5*(V-R)^2/4 = (V-R)/4 where unclipped is chosen; 0 through a clipped V
    expected = torch.tensor([[0.0, 0.6 / 4, -1.0 / 4, 0.0, 0.0]])
    torch.testing.assert_close(values.grad, expected, atol=1e-6, rtol=0)


def test_pairwise_loss_and_accuracy():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 1.0, 1.0])
    loss, acc = pairwise_loss(chosen, rejected)
    # -log sigmoid(d) = log(1 + e^-d): d = 1, -1, 0
    expected = (softplus(-1.0) + softplus(1.0) + math.log(2.0)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert acc.item() == pytest.approx(1 / 3, abs=1e-6)  # the tie counts as wrong


def test_pairwise_loss_is_stable_for_large_margins():
    loss, acc = pairwise_loss(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0]))
    # log(1 + e^-200) ~ 0 ; log(1 + e^200) ~ 200
    assert loss.item() == pytest.approx(100.0, abs=1e-4)
    assert acc.item() == 0.5


PAD = 0


def test_dschat_pairwise_loss_hand_example():
    chosen_ids = torch.tensor([[5, 6, 7, 8, 9, PAD], [5, 6, 7, PAD, PAD, PAD]])
    rejected_ids = torch.tensor([[5, 6, 3, 4, PAD, PAD], [5, 6, 7, PAD, PAD, PAD]])
    chosen_values = torch.tensor([[9.0, 9.0, 1.0, 2.0, 0.5, 9.0], [9.0, 9.0, 1.0, 9.0, 9.0, 9.0]])
    rejected_values = torch.tensor([[-9.0, -9.0, 0.0, 2.0, 1.5, -9.0], [-9.0, -9.0, 0.0, -9.0, -9.0, -9.0]])
    loss, acc = dschat_pairwise_loss(chosen_values, rejected_values, chosen_ids, rejected_ids, pad_id=PAD)
    # pair 0: len_c 5, len_r 4, first difference at t=2 -> tokens t = 2, 3, 4 (end of the longer)
    #   c - r = 1, 0, -1 -> mean(log(1+e^-1), log 2, log(1+e^1))
    pair0 = (softplus(-1.0) + math.log(2.0) + softplus(1.0)) / 3
    # pair 1: identical -> last real token t = 2 only: c - r = 1
    pair1 = softplus(-1.0)
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, abs=1e-6)
    # end scores: pair 0: c[4] = 0.5 < r[3] = 2.0 ; pair 1: c[2] = 1 > r[2] = 0
    assert acc.item() == pytest.approx(0.5, abs=1e-6)
    # the same lengths from attention masks
    am_c = (chosen_ids != PAD).long()
    am_r = (rejected_ids != PAD).long()
    loss2, acc2 = dschat_pairwise_loss(
        chosen_values, rejected_values, chosen_ids, rejected_ids, PAD,
        chosen_attention_mask=am_c, rejected_attention_mask=am_r,
    )
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7) and acc2.item() == acc.item()


def test_dschat_pairwise_loss_unpadded_and_leading_pad():
    # no padding at all: the span runs to seq_len; OPT-style leading pad skipped with num_padding_at_beginning=1
    chosen_ids = torch.tensor([[PAD, 5, 6, 7]])
    rejected_ids = torch.tensor([[PAD, 5, 8, 7]])
    cv = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    rv = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    loss, acc = dschat_pairwise_loss(cv, rv, chosen_ids, rejected_ids, PAD, num_padding_at_beginning=1)
    # first difference t=2, lengths 4 -> t = 2, 3: c - r = 2, 0
    assert loss.item() == pytest.approx((softplus(-2.0) + math.log(2.0)) / 2, abs=1e-6)
    assert acc.item() == 0.0  # end scores tie (1 vs 1)


def test_dschat_pairwise_loss_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        dschat_pairwise_loss(torch.zeros(1, 3), torch.zeros(1, 4), torch.zeros(1, 3), torch.zeros(1, 4), PAD)


def test_dpo_loss_hand_values():
    pc = torch.tensor([-10.0, -5.0])
    pr = torch.tensor([-12.0, -4.0])
    rc = torch.tensor([-11.0, -5.0])
    rr = torch.tensor([-11.0, -5.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # h = (pc - pr) - (rc - rr): 2 - 0 = 2 ; -1 - 0 = -1  -> beta*h = 0.2, -0.1
    # -log sigmoid(x) = log(1 + e^-x)
    expected = (softplus(-0.2) + softplus(0.1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # chosen rewards 0.1*(pc - rc) = 0.1, 0 ; rejected 0.1*(pr - rr) = -0.1, 0.1
    assert stats["chosen_rewards"].item() == pytest.approx(0.05, abs=1e-6)
    assert stats["rejected_rewards"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["reward_accuracy"].item() == pytest.approx(0.5, abs=1e-6)
    # margins 0.2, -0.1 -> 0.05
    assert stats["margin"].item() == pytest.approx(0.05, abs=1e-6)


def test_dpo_loss_label_smoothing():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    # 0.9 * -log sigmoid(0.2) + 0.1 * -log sigmoid(-0.2)
    assert loss.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


def test_dpo_gradient_flows_to_policy_only():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-12.0], requires_grad=True)
    loss, stats = dpo_loss(pc, pr, torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    loss.backward()
    # d/dpc of -log sigmoid(beta*h) = -beta * sigmoid(-beta*h) = -0.1 * sigmoid(-0.2)
    g = -0.1 / (1 + math.exp(0.2))
    assert pc.grad.item() == pytest.approx(g, abs=1e-7)
    assert pr.grad.item() == pytest.approx(-g, abs=1e-7)


def test_policy_loss_huge_log_ratio_stays_finite():
    """A token whose probability collapsed between rollout and update (log-ratio +-1000) must not
    give an inf ratio, an inf/nan loss or nan gradients: the log-ratio is clamped before exp."""
    new = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1000.0, -1.0, 998.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 3))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(new.grad).all()
    assert math.isfinite(stats["ratio_mean"].item())
