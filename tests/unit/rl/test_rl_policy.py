"""The generalised clipped policy objective: loss aggregations, the sequence-level (GSPO) ratio,
asymmetric clipping (DAPO) and the KL term in the loss, against hand-computed values."""

import math

import pytest
import torch

from chatrl.rl import aggregate_loss, clipped_policy_loss, policy_log_ratio, policy_loss

# two answers: row 0 has 1 token, row 1 has 3 (a 4th padded entry holding garbage)
X = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 4.0, 7.0, float("inf")]])
MASK = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])


def test_token_mean():
    # (2 + 1 + 4 + 7) / 4 tokens = 3.5
    assert aggregate_loss(X, MASK, "token_mean").item() == pytest.approx(3.5)


def test_seq_mean_token_mean():
    # per answer: 2 / 1 = 2 and (1 + 4 + 7) / 3 = 4; mean over answers = 3
    assert aggregate_loss(X, MASK, "seq_mean_token_mean").item() == pytest.approx(3.0)


def test_seq_mean_token_sum_norm_divides_by_a_constant():
    # Dr. GRPO: (2 + 1 + 4 + 7) / (2 answers x max_len 8) = 14 / 16
    assert aggregate_loss(X, MASK, "seq_mean_token_sum_norm", max_len=8).item() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(X, MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(X, MASK, "mean")


def test_aggregations_weight_tokens_differently_in_the_gradient():
    x = torch.zeros(2, 4, requires_grad=True)
    aggregate_loss(x, MASK, "token_mean").backward()
    assert x.grad[0, 0] == pytest.approx(0.25) and x.grad[1, 0] == pytest.approx(0.25)
    x.grad = None
    aggregate_loss(x, MASK, "seq_mean_token_mean").backward()
    # the lone token of the short answer weighs 1/2, each of the long answer's 1/6
    assert x.grad[0, 0] == pytest.approx(0.5) and x.grad[1, 0] == pytest.approx(1 / 6)
    assert x.grad[1, 3] == 0.0


def test_sequence_level_ratio_is_the_mean_log_ratio():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.3, -0.1, 5.0], [0.2, 0.4, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    tok = policy_log_ratio(new, old, mask, "token")
    torch.testing.assert_close(tok, torch.tensor([[0.3, -0.1, 0.0], [0.2, 0.4, 0.0]]))
    seq = policy_log_ratio(new, old, mask, "sequence")
    # row 0: (0.3 - 0.1) / 2 = 0.1 on its 2 tokens; row 1: 0.6 / 3 = 0.2 on all 3
    torch.testing.assert_close(seq, torch.tensor([[0.1, 0.1, 0.0], [0.2, 0.2, 0.2]]))


def test_gspo_loss_and_gradient():
    # one answer, 2 tokens, log-ratios 0.3 and -0.1: s = exp(0.1); A = 1, clip 0.2 (not acting)
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.3, -0.1]], requires_grad=True)
    loss, st = clipped_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), clip_low=0.2,
                                   ratio_level="sequence", aggregation="seq_mean_token_mean")
    s = math.exp(0.1)
    assert loss.item() == pytest.approx(-s, rel=1e-6)
    loss.backward()
    # d(-s)/d logp_t = -s * 1/|y| for each token
    assert new.grad[0].tolist() == pytest.approx([-s / 2, -s / 2], rel=1e-6)
    assert st["clipfrac"].item() == 0.0
    # a tiny GSPO clip range acts on the whole answer at once
    new2 = torch.tensor([[0.3, -0.1]], requires_grad=True)
    loss2, st2 = clipped_policy_loss(new2, old, torch.ones(1, 2), torch.ones(1, 2), clip_low=3e-4,
                                     clip_high=4e-4, ratio_level="sequence",
                                     aggregation="seq_mean_token_mean")
    assert loss2.item() == pytest.approx(-(1 + 4e-4), rel=1e-6)
    assert st2["clipfrac"].item() == 1.0 and st2["clipfrac_high"].item() == 1.0
    loss2.backward()
    assert new2.grad.abs().sum().item() == 0.0


def test_asymmetric_clipping_low_and_high():
    # ratios 1.25 (A>0), 1.35 (A>0), 0.7 (A<0), 0.9 (A<0); clip_low 0.2, clip_high 0.28
    ratios = torch.tensor([[1.25, 1.35, 0.7, 0.9]])
    new = torch.log(ratios).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, st = clipped_policy_loss(new, torch.zeros(1, 4), adv, torch.ones(1, 4),
                                   clip_low=0.2, clip_high=0.28)
    # token terms max(-A r, -A clip(r, 0.8, 1.28)):
    #   1.25: -1.25 vs -1.25 -> -1.25 (inside: symmetric 0.2 would have clipped it)
    #   1.35: -1.35 vs -1.28 -> -1.28 (clipped high)
    #   0.70:  0.70 vs  0.80 ->  0.80 (clipped low)
    #   0.90:  0.90 vs  0.90 ->  0.90
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 + 0.9) / 4, rel=1e-6)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    assert st["clipfrac_high"].item() == pytest.approx(0.25)
    assert st["clipfrac_low"].item() == pytest.approx(0.25)
    loss.backward()
    # gradient -A r / 4 where unclipped, 0 where clipped
    assert new.grad[0].tolist() == pytest.approx([-1.25 / 4, 0.0, 0.0, 0.9 / 4], rel=1e-6)
    # the symmetric PPO clip would have clipped the 1.25 token too
    _, sym = clipped_policy_loss(torch.log(ratios), torch.zeros(1, 4), adv, torch.ones(1, 4),
                                 clip_low=0.2)
    assert sym["clipfrac_high"].item() == pytest.approx(0.5)


def test_kl_in_the_loss_k3_and_masking():
    lp = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0]])
    adv = torch.zeros(1, 3)
    loss, st = clipped_policy_loss(lp, lp.detach(), adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                   kl_estimator="k3")
    # k3 = exp(ref - lp) - (ref - lp) - 1: t0: e^-0.5 + 0.5 - 1; t1: e^1 - 1 - 1
    k = [math.exp(-0.5) - 0.5, math.e - 2.0]
    assert st["kl"].item() == pytest.approx(sum(k) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(k) / 2, rel=1e-6)  # A = 0: only the KL term
    loss.backward()
    # d k3 / d lp = 1 - exp(ref - lp); the padded -inf entry gets no (nan) gradient
    want = [0.1 / 2 * (1 - math.exp(-0.5)), 0.1 / 2 * (1 - math.e), 0.0]
    assert lp.grad.tolist()[0] == pytest.approx(want, rel=1e-6)
    # kl_coef 0 or no reference: no KL term, no "kl" stat
    _, st0 = clipped_policy_loss(lp, lp.detach(), adv, mask, ref_logprobs=ref, kl_coef=0.0)
    assert "kl" not in st0


def test_ppo_policy_loss_is_the_symmetric_token_mean_case():
    g = torch.Generator().manual_seed(0)
    new, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    a, sa = policy_loss(new, old, adv, mask, clip_range=0.1)
    b, sb = clipped_policy_loss(new, old, adv, mask, clip_low=0.1, clip_high=0.1)
    assert a.item() == b.item() and sa["clipfrac"].item() == sb["clipfrac"].item()
    assert sb["clipfrac"].item() == pytest.approx(sb["clipfrac_low"].item() + sb["clipfrac_high"].item())
