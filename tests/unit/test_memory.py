"""Per-interval peak RSS (chatrl.engine.memory): a short-lived allocation shows in the interval's
peak and not in the next one, and the kernel's own high-water mark is left alone."""

import time

import pytest
import torch

from chatrl.engine.memory import peak_rss_gb, reset_peak_rss, rss_gb

pytestmark = pytest.mark.skipif(rss_gb() is None, reason="needs /proc")


def _vmhwm_gb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 / 1e9


def test_peak_of_an_interval_sees_a_freed_allocation_and_resets():
    reset_peak_rss()
    base = rss_gb()
    x = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    time.sleep(0.2)
    del x
    time.sleep(0.1)
    peak = peak_rss_gb()
    assert peak >= base + 0.35, (base, peak)
    hwm = _vmhwm_gb()
    reset_peak_rss()
    time.sleep(0.1)
    assert peak_rss_gb() < peak - 0.3
    assert _vmhwm_gb() >= hwm  # the kernel's peak (what /usr/bin/time reports) is untouched
