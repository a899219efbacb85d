"""Peak resident memory (RSS) of this process, per logged step.

A daemon thread samples the process's RSS (/proc/self/statm) every 20 ms and keeps the largest
value since the last reset_peak_rss(), so each interval between two log rows has its own peak.
The kernel's own high-water mark (VmHWM) is left alone: resetting it (clear_refs) would also
reset what `/usr/bin/time -v` reports for the whole run. Allocations that live under 20 ms can
be missed; the large ones of training (activations, logits, optimizer states) live far longer.
Where /proc is missing the lifetime peak from getrusage is returned.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time

__all__ = ["peak_rss_gb", "release_freed_memory", "reset_peak_rss", "rss_gb"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_INTERVAL_S = 0.02


def rss_gb() -> float | None:
    """The current RSS in GB, or None without /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 1e9
    except (OSError, IndexError, ValueError):
        return None


class _Sampler:
    def __init__(self):
        self.peak = rss_gb() or 0.0
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="chatrl-rss", daemon=True).start()

    def _run(self):
        while True:
            now = rss_gb()
            if now is None:
                return
            with self.lock:
                self.peak = max(self.peak, now)
            time.sleep(_INTERVAL_S)

    def take(self, reset: bool) -> float:
        now = rss_gb() or 0.0
        with self.lock:
            peak = max(self.peak, now)
            if reset:
                self.peak = now
        return peak


_SAMPLER: _Sampler | None = None


def _sampler() -> _Sampler | None:
    global _SAMPLER
    if _SAMPLER is None and rss_gb() is not None:
        _SAMPLER = _Sampler()
    return _SAMPLER


def peak_rss_gb() -> float:
    """The peak RSS in GB since the last reset_peak_rss() (the first call starts the sampling,
    so call reset_peak_rss() at the start of what you measure)."""
    s = _sampler()
    if s is not None:
        return s.take(reset=False)
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def reset_peak_rss() -> None:
    """Start a new peak interval."""
    s = _sampler()
    if s is not None:
        s.take(reset=True)


def release_freed_memory() -> bool:
    """Hand the memory the process has freed but the C allocator still holds back to the
    system (glibc's malloc_trim); True where that was done.

    glibc keeps freed blocks of its heaps for reuse, and only returns the free space at a heap's
    top. `chatrl train` runs its steps in one process, so what step 2 freed (its peak is the whole
    run's, ~5 GB for the default run) stayed resident through step 3: the default run's step 3
    logged 4.75-4.80 GB per iteration in one run where it logs 2.7-3.3 GB when run alone. Called
    between steps. A no-op where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
