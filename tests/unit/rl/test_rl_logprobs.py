"""Log-probs, entropy and the SFT loss, against hand values and a naive log_softmax."""

import math

import pytest
import torch
import torch.nn.functional as F

from chatrl.rl import (entropy_from_logits, gather_logprobs, next_token_logprobs, sequence_logprobs, sft_loss,
                       token_counts)

LN3 = math.log(3.0)


def test_gather_logprobs_hand_values():
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3], [0.0, LN3]]])
    labels = torch.tensor([[1, 0, -100]])
    out = gather_logprobs(logits, labels)
    expected = torch.tensor([[math.log(3 / 4), math.log(1 / 4), 0.0]])  # ignored label -> 0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [None, 1, 3, 64])
def test_gather_logprobs_matches_naive_log_softmax(chunk_tokens):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (3, 7), generator=g)
    naive = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = gather_logprobs(logits, labels, chunk_tokens=chunk_tokens)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive, atol=1e-12, rtol=0)
    # fp32: equal up to fp32 rounding (values reach ~16 in magnitude)
    out32 = gather_logprobs(logits.float(), labels, chunk_tokens=chunk_tokens)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, naive.float(), atol=1e-6, rtol=1e-6)


def test_gather_logprobs_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    gather_logprobs(a, labels, chunk_tokens=2).sum().backward()
    torch.log_softmax(b, -1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_gather_logprobs_bf16_is_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 4, 50, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 50, (2, 4), generator=g)
    out = gather_logprobs(logits, labels)
    assert out.dtype == torch.float32
    naive = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, naive, atol=1e-6, rtol=0)


def test_gather_logprobs_non_contiguous_shifted_view():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 5, generator=g)
    ids = torch.randint(0, 5, (2, 6), generator=g)
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits[:, :-1], ids[:, 1:]), naive, atol=1e-6, rtol=0)


def test_next_token_logprobs_equal_the_shifted_slice_without_copying_the_logits():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 6, 7, generator=g)
    ids = torch.randint(0, 7, (3, 6), generator=g)
    ids[0, 4] = -100
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    out = next_token_logprobs(a, ids)
    ref = gather_logprobs(b[:, :-1], ids[:, 1:])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert out.shape == (3, 5) and out[0, 3] == 0
    (out * torch.arange(15.0).view(3, 5)).sum().backward()
    (ref * torch.arange(15.0).view(3, 5)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    assert not a.grad[:, -1].any()   # the last position predicts nothing


def test_default_chunks_on_cpu_match_naive_values_and_gradients():
    """A vocabulary large enough that the default CPU chunking splits the rows: values and
    gradients equal one naive log_softmax over everything."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 40, 65536, generator=g) * 3      # 5.2M elements: 3 chunks on a CPU
    labels = torch.randint(0, 65536, (2, 40), generator=g)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    w = torch.randn(2, 40, generator=g)
    out = gather_logprobs(a, labels, temperature=0.7)
    naive = torch.log_softmax(b / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # log-probs reach ~-30 here: fp32 rounding of the log-sum-exp differs by kernel (AVX2 / AVX512)
    torch.testing.assert_close(out, naive, atol=1e-5, rtol=1e-5)
    (out * w).sum().backward()
    (naive * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-4)
    ent = entropy_from_logits(base, temperature=0.7)
    z = base.double() / 0.7
    naive_ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    # fp32: logsumexp (~20 here) minus E[z] (~19) loses ~1e-5 x 20 to cancellation
    torch.testing.assert_close(ent.double(), naive_ent, atol=5e-4, rtol=0)


def test_gather_logprobs_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        gather_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


def test_entropy_hand_values():
    # uniform over 4 -> ln 4 ; [0, ln 3] -> p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, LN3, -1e4, -1e4]]])
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4.0), h2]]), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 7, generator=g)
    p = torch.softmax(z, -1)
    naive = -(p * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(z, chunk_tokens=2), naive, atol=1e-6, rtol=0)


def _sft_example():
    # positions t = 0..3; logits at t predict labels[t+1]
    logits = torch.tensor(
        [
            [
                [0.0, LN3],  # t=0 predicts labels[1] = 1: p = 3/4
                [0.0, 0.0],  # t=1 predicts labels[2] = 0: p = 1/2
                [50.0, -50.0],  # t=2 predicts labels[3] = -100: ignored
                [1e4, -1e4],  # t=3 predicts nothing (last position is never used)
            ]
        ]
    )
    labels = torch.tensor([[1, 1, 0, -100]])  # labels[0] is never a target
    return logits, labels


def test_sft_loss_shifts_and_ignores():
    logits, labels = _sft_example()
    expected = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    assert sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert sft_loss(logits, labels, reduction="sum").item() == pytest.approx(2 * expected, abs=1e-6)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert sft_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(token_counts(labels), torch.tensor([2]))


def test_sft_loss_is_a_token_level_mean_over_the_batch():
    logits, labels = _sft_example()
    labels2 = torch.tensor([[1, -100, 0, -100]])  # only t=1 counts, -log(1/2)
    both = sft_loss(torch.cat([logits, logits]), torch.cat([labels, labels2]))
    expected = (-math.log(3 / 4) - math.log(1 / 2) - math.log(1 / 2)) / 3
    assert both.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(token_counts(torch.cat([labels, labels2])), torch.tensor([2, 1]))


def test_sft_loss_all_ignored_is_zero_not_nan():
    logits, _ = _sft_example()
    assert sft_loss(logits, torch.full((1, 4), -100)).item() == 0.0


def test_sft_loss_bad_reduction():
    logits, labels = _sft_example()
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(logits, labels, reduction="none")


def test_sequence_logprobs():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), -4.0]])
    mask = torch.tensor([[1.0, 1, 0], [1.0, 0, 1]])
    # -1 - 2 = -3 ; -0.5 - 4 = -4.5 (the -inf is masked out)
    torch.testing.assert_close(sequence_logprobs(lp, mask), torch.tensor([-3.0, -4.5]))


def test_temperature_divides_after_the_fp32_upcast():
    """bf16 logits / T rounded in bf16 shift log-probs by ~1e-2; the sampling policy is
    softmax(fp32(logits) / T), which the rollout's log-probs use, so the training forward must too."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 300, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 300, (2, 7), generator=g)
    T = 0.7
    exact = torch.log_softmax(logits.float() / T, -1).gather(-1, labels[..., None])[..., 0]
    got = gather_logprobs(logits, labels, temperature=T)
    assert torch.allclose(got, exact, atol=1e-5), (got - exact).abs().max()
    rounded = gather_logprobs(logits / T, labels)  # dividing in bf16 first
    assert (rounded - exact).abs().max() > 1e-3
    ent = entropy_from_logits(logits, temperature=T)
    p = torch.softmax(logits.float() / T, -1)
    assert torch.allclose(ent, -(p * torch.log(p)).sum(-1), atol=1e-4)
    assert torch.equal(gather_logprobs(logits, labels, temperature=1.0), gather_logprobs(logits, labels))
