"""The report's RLHF - SFT judge gain: a paired mean and its standard error."""

from __future__ import annotations

import pytest

from chatrl.report import paired_gain


def test_paired_gain_and_standard_error():
    before = [0.5, 0.6, 0.7, 0.8]
    after = [0.6, 0.6, 0.9, 0.9]            # differences 0.1, 0, 0.2, 0.1
    mean, se = paired_gain(before, after)
    assert mean == pytest.approx(0.1)
    # sample variance of the differences: (0 + 0.01 + 0.01 + 0) / 3
    assert se == pytest.approx((0.02 / 3 / 4) ** 0.5)
    assert paired_gain(before, after[:3]) is None and paired_gain(None, after) is None
    assert paired_gain([0.1], [0.2]) is None
