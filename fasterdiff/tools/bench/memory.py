"""Peak memory of one call: CUDA's allocator peak, or resident memory sampled on CPU."""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """``with PeakMemory(device) as m: ...``; then ``m.peak`` is the peak in bytes and
    ``m.added`` the peak above the level when the block began (the call's working
    memory, without the weights already loaded).

    On CPU a thread samples the process RSS every 5 ms (so a spike shorter than
    that can be missed); on CUDA it is ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.peak = self.base = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False

    @property
    def added(self) -> int:
        return self.peak - self.base
