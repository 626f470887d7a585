"""Measuring a phase: its seconds, and its peak host RSS and device memory."""
from __future__ import annotations

import contextlib
import resource
import time

import torch

from .hostmem import release_free_memory


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_host_rss_bytes() -> int:
    """Peak RSS of this process since the last reset. VmHWM belongs to the current address space;
    ru_maxrss would also count the parent's RSS at fork, which Linux carries across exec."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # macOS: bytes


def current_host_rss_bytes() -> int:
    current = _status_bytes("VmRSS")
    return current if current is not None else peak_host_rss_bytes()


def reset_peak_host_rss() -> bool:
    """Start a new VmHWM period (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Seconds and peak memory of each phase: host peak RSS (VmHWM, reset as each phase starts) and on
    CUDA the caching allocator's peak reserved bytes (what the process holds on the GPU, cached
    blocks included) and peak allocated bytes. A phase entered twice keeps the larger peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict[str, int | None]] = {}
        self.host_resets = True

    @contextlib.contextmanager
    def __call__(self, phase: str):
        release_free_memory()  # what the last phase freed is not this phase's peak
        self.host_resets &= reset_peak_host_rss()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            measured = {"host": peak_host_rss_bytes(),
                        "device_reserved": torch.cuda.max_memory_reserved(self.device) if cuda else None,
                        "device_allocated": torch.cuda.max_memory_allocated(self.device) if cuda else None}
            previous = self.peaks.get(phase, {})
            self.peaks[phase] = {k: max(v, previous.get(k) or 0) if v is not None else None
                                 for k, v in measured.items()}

    def overall(self, key: str) -> int | None:
        values = [p[key] for p in self.peaks.values() if p.get(key) is not None]
        if key == "host":
            values.append(peak_host_rss_bytes())
        return max(values) if values else None
