"""Peak memory of a stretch of work, above what was in use when it began.

CUDA: the caching allocator's own count (`max_memory_allocated`), reset at the start.
CPU on Linux: the process's resident-set high-water mark (VmHWM), reset to the current resident
size through /proc/self/clear_refs, so each measurement sees only its own peak; freed memory is
handed back to the system first (glibc malloc_trim), so memory an earlier measurement freed but
kept does not hide this one's growth.
Where the mark cannot be reset but /proc is there: the resident size sampled every millisecond
by a thread (a peak shorter than that can be missed). Without /proc (macOS): growth of the
process's lifetime peak (ru_maxrss), which sees only what rises above every earlier peak.
Each measurement's `method` says which of these it used.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import sys
import threading
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


def _trim_heap() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc
            pass


def _can_reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


METHODS = {
    "cuda": "CUDA max_memory_allocated above the allocation at start",
    "high_water_mark": "peak resident set (VmHWM, reset at start) above the resident set at start",
    "sampled": "resident set sampled every 1 ms, peak above the start (short peaks can be missed)",
    "lifetime": "growth of the lifetime peak resident set (ru_maxrss; earlier peaks hide smaller ones)",
}


class PeakMemory:
    """with PeakMemory(device) as peak: ...; then peak.bytes (growth) and peak.method (how)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.kind = ""
        self._start = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0

    @property
    def method(self) -> str:
        return METHODS.get(self.kind, "")

    def __enter__(self) -> "PeakMemory":
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind, self._start = "cuda", torch.cuda.memory_allocated(self.device)
        elif _can_reset_high_water_mark():
            self.kind, self._start = "high_water_mark", _status_kib("VmRSS") * 1024
        elif _STATUS.exists():
            self.kind, self._start = "sampled", _status_kib("VmRSS") * 1024
            self._sampled_peak = self._start
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        else:
            self.kind, self._start = "lifetime", _lifetime_peak_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "high_water_mark":
            peak = _status_kib("VmHWM") * 1024
        elif self.kind == "sampled":
            self._stop.set()
            self._sampler.join()
            peak = self._sampled_peak
        else:
            peak = _lifetime_peak_bytes()
        self.bytes = max(0, peak - self._start)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, _status_kib("VmRSS") * 1024)
            time.sleep(1e-3)


def _lifetime_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB elsewhere
