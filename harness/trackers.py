"""Peak-memory measurement around one generation: CUDA allocator peak on a GPU, sampled RSS on a CPU."""
from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """Context manager; `.peak_bytes` after exit. The RSS sampler wakes every `interval` s (cheap)."""

    def __init__(self, device: str, interval: float = 0.05) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device
        self.interval = interval
        self.peak_bytes: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._process = psutil.Process()
            self.peak_bytes = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes or 0, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes or 0, self._process.memory_info().rss)
