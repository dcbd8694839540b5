"""Peak extra memory of a block of work, the one measure `scale` (bench) and `evaluate` report.

On CUDA: `torch.cuda.max_memory_allocated` above what was allocated at entry (exact, tensors
only). On the CPU: the process's resident memory sampled every 2 ms by a thread, peak above
the level at entry (coarse: memory the allocator kept from earlier work is not counted again).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.mb`: the peak above the level at entry."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._proc = psutil.Process()
            self._base = self._peak = self._proc.memory_info().rss
            self._parked = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
            self._parked.wait()  # the sampler's start-up is not part of the measured block
        return self

    def _sample(self) -> None:
        self._parked.set()
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.mb = round((peak - self._base) / 2**20, 1)
