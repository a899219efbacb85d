"""Peak resident memory (RSS) of this process, per logged step.

Linux keeps the process's peak RSS (VmHWM in /proc/self/status) and lets the process reset it
(writing 5 to /proc/self/clear_refs), so the peak of each interval between two log rows is
exact and costs two small file operations. Elsewhere the lifetime peak from getrusage is used.
"""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_gb", "reset_peak_rss"]

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"


def _vm(field: str) -> float | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return None


def peak_rss_gb() -> float:
    """The peak RSS in GB since the last reset_peak_rss() (or since the start)."""
    hwm = _vm("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def reset_peak_rss() -> bool:
    """Start a new peak-RSS interval; False where the OS does not allow it."""
    try:
        with open(_CLEAR, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
