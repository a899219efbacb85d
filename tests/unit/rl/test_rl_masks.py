"""Masked statistics, whitening and the response mask, against hand-computed values."""

import math

import pytest
import torch

from chatrl.rl import last_token_values, masked_mean, masked_sum, masked_var, response_mask, whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
# masked entries: 1, 2, 4 -> n = 3, mean = 7/3
# deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9
# biased var = 42/9 / 3 = 14/9, unbiased var = 42/9 / 2 = 7/3
MEAN = 7 / 3
VAR_UNBIASED = 7 / 3
VAR_BIASED = 14 / 9


def test_masked_sum_and_mean():
    assert masked_sum(X, M).item() == pytest.approx(7.0, abs=1e-6)
    assert masked_mean(X, M).item() == pytest.approx(MEAN, abs=1e-6)
    # per row: (1 + 2) / 2 = 1.5 ; 4 / 1 = 4
    torch.testing.assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]))


def test_masked_mean_bool_mask_and_empty_mask():
    assert masked_mean(X, M.bool()).item() == pytest.approx(MEAN, abs=1e-6)
    assert masked_mean(X, torch.zeros_like(X)).item() == 0.0
    # an empty row gives 0, not nan
    torch.testing.assert_close(masked_mean(X, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), dim=-1), torch.tensor([1.0, 0.0]))


def test_masked_entries_never_leak_even_if_nan_or_inf():
    x = X.clone()
    x[0, 2] = float("nan")
    x[1, 1] = float("-inf")
    x.requires_grad_(True)
    out = masked_mean(x, M)
    assert out.item() == pytest.approx(MEAN, abs=1e-6)
    out.backward()
    # d mean / d x_i = 1/3 on the masked entries, 0 elsewhere, and never nan
    torch.testing.assert_close(x.grad, M / 3)


def test_masked_var():
    assert masked_var(X, M).item() == pytest.approx(VAR_UNBIASED, abs=1e-6)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(VAR_BIASED, abs=1e-6)
    # one entry: unbiased variance undefined -> 0 by convention
    one = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_var(X, one).item() == 0.0


def test_whiten_uses_masked_unbiased_statistics():
    out = whiten(X, M)
    s = math.sqrt(VAR_UNBIASED + 1e-8)
    expected = torch.tensor([[(1 - MEAN) / s, (2 - MEAN) / s, 0.0], [(4 - MEAN) / s, 0.0, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the masked entries now have mean 0 and unbiased variance 1 (up to eps)
    assert masked_mean(out, M).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, M).item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_without_shifting_the_mean():
    out = whiten(X, M, shift_mean=False)
    s = math.sqrt(VAR_UNBIASED + 1e-8)
    expected = torch.tensor(
        [[(1 - MEAN) / s + MEAN, (2 - MEAN) / s + MEAN, 0.0], [(4 - MEAN) / s + MEAN, 0.0, 0.0]]
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_whiten_single_token_is_finite():
    one = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = whiten(X, one)
    assert torch.isfinite(out).all()
    assert out.abs().max().item() == 0.0


EOS, PAD = 2, 0


def test_response_mask_eos_mid_sequence_and_truncated():
    ids = torch.tensor(
        [
            [5, 6, 2, 0, 0],  # EOS at 2: counts, padding after it does not
            [5, 2, 7, 2, 0],  # only the FIRST EOS ends the response
            [5, 6, 7, 8, 9],  # no EOS: truncated answer, all counts
            [2, 0, 0, 0, 0],  # immediate EOS
        ]
    )
    expected = torch.tensor(
        [
            [1.0, 1, 1, 0, 0],
            [1.0, 1, 0, 0, 0],
            [1.0, 1, 1, 1, 1],
            [1.0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(response_mask(ids, EOS, PAD), expected)
    torch.testing.assert_close(response_mask(ids, EOS), expected)
    assert response_mask(ids, EOS).dtype == torch.float32


def test_response_mask_pad_equal_to_eos():
    # pad == eos: the first EOS counts, the pads (same id) after it do not
    ids = torch.tensor([[5, 2, 2, 2, 2], [5, 6, 7, 8, 2], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1.0, 1, 0, 0, 0], [1.0, 1, 1, 1, 1], [1.0, 1, 1, 1, 1]])
    torch.testing.assert_close(response_mask(ids, eos_token_id=2, pad_token_id=2), expected)


def test_response_mask_several_eos_ids_and_pad_without_eos():
    ids = torch.tensor([[5, 9, 2, 0], [5, 6, 0, 0]])
    # 9 and 2 both end a response (Llama-3 style); row 1 was padded without an EOS
    torch.testing.assert_close(
        response_mask(ids, eos_token_id=[2, 9], pad_token_id=0), torch.tensor([[1.0, 1, 0, 0], [1.0, 1, 0, 0]])
    )


def test_response_mask_rejects_bad_shape():
    with pytest.raises(ValueError, match="batch, response_len"):
        response_mask(torch.tensor([5, 2]), EOS)


def test_last_token_values():
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1, 0, 0], [1.0, 1, 1, 1]])
    torch.testing.assert_close(last_token_values(values, mask), torch.tensor([0.2, 4.0]))


def test_whiten_from_summed_moments_equals_whitening_the_concatenation():
    """PPO whitens over every rollout batch of an update and every rank: summing the batches'
    (count, sum, sum of squares) and whitening each batch with the total equals whitening all of
    them at once; whitening one answer alone would make its advantages sum to 0."""
    from chatrl.rl import masked_moments, whiten_from_moments

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, n, generator=g, dtype=torch.float64) + k for k, n in enumerate((3, 5, 2, 4))]
    ms = [(torch.arange(x.shape[1]) < x.shape[1] - k % 2).double()[None] for k, x in enumerate(xs)]
    width = max(x.shape[1] for x in xs)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    whole = whiten(torch.cat([pad(x) for x in xs]), torch.cat([pad(m) for m in ms]))
    total = sum(masked_moments(x, m) for x, m in zip(xs, ms))
    assert total[0].item() == sum(m.sum().item() for m in ms)
    for i, (x, m) in enumerate(zip(xs, ms)):
        w = whiten_from_moments(x, m, total)
        assert torch.allclose(w, whole[i:i + 1, :x.shape[1]], atol=1e-12)
        assert abs(w.sum().item()) > 0.1  # each answer keeps its own level
        assert abs(whiten(x, m).sum().item()) < 1e-9  # alone, it would sum to 0
    # hand values: [1, 2, 3] -> mean 2, unbiased var 1
    w = whiten_from_moments(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), torch.tensor([3.0, 6.0, 14.0]))
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6)
