"""Cutting a stream into model windows, and a cheap activity gate that skips silence before the model runs.

Windows start every `hop_s` seconds and last `window_s`. The last partial window of a finite stream is kept (the
front end pads it, as the reference pads short clips) rather than dropped, so the tail of a recording is always heard:
the reference CLI drops it (MODEL.md, known bugs).
"""

from __future__ import annotations

import math

import numpy as np


class Windower:
    """Accumulates mono blocks and yields (samples, start_sample) for each complete window, in order.

    `push` takes blocks of any size; memory stays bounded by one window plus one block.
    """

    def __init__(self, window_s: float, hop_s: float, sample_rate: int):
        if window_s <= 0 or hop_s <= 0:
            raise ValueError("window and hop must be positive")
        if hop_s > window_s:
            # Gaps between windows would leave audio unheard; a field recorder should never do that silently.
            raise ValueError(f"hop {hop_s} s is longer than the window {window_s} s: audio between windows is lost")
        self.sample_rate = int(sample_rate)
        self.window = round(window_s * sample_rate)
        self.hop = round(hop_s * sample_rate)
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._next = 0  # absolute start of the next window
        self._total = 0  # samples pushed so far
        self._emitted_to = 0  # end of the last emitted window

    @property
    def samples_seen(self) -> int:
        return self._total

    def push(self, block: np.ndarray) -> list[tuple[np.ndarray, int]]:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, block]) if self._buf.size else block.copy()
        self._total += block.size
        out = []
        while self._next + self.window <= self._total:
            a = self._next - self._buf_start
            out.append((self._buf[a : a + self.window].copy(), self._next))
            self._emitted_to = self._next + self.window
            self._next += self.hop
        # keep only what a future window can still need
        drop = min(self._next, self._total) - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out

    def flush(self) -> tuple[np.ndarray, int] | None:
        """The last partial window (shorter than `window`), if audio after the last complete window is unheard."""
        if self._total <= self._emitted_to or self._next >= self._total:
            return None
        a = self._next - self._buf_start
        samples = self._buf[a:].copy()
        self._emitted_to = self._total
        self._next = self._total
        return samples, self._total - samples.size


def window_count(total_samples: int, window: int, hop: int) -> int:
    """How many windows Windower yields (complete + the padded last one) for a stream of `total_samples`."""
    if total_samples <= 0:
        return 0
    if total_samples < window:
        return 1
    complete = (total_samples - window) // hop + 1
    covered = (complete - 1) * hop + window
    return complete + (1 if covered < total_samples else 0)


class ActivityGate:
    """Skips windows that are near-silent, before any model work.

    Level: RMS of the DC-removed signal in dBFS (full scale = 1.0). Windows below `threshold_dbfs` are skipped.
    None disables the gate. Cheap: one pass over the samples.
    """

    def __init__(self, threshold_dbfs: float | None = None):
        self.threshold_dbfs = threshold_dbfs
        self.skipped = 0

    @staticmethod
    def level_dbfs(samples: np.ndarray) -> float:
        x = np.asarray(samples, dtype=np.float64)
        if x.size == 0:
            return -math.inf
        x = x - x.mean()
        rms = math.sqrt(float(np.mean(x * x)))
        return 20 * math.log10(rms) if rms > 0 else -math.inf

    def passes(self, samples: np.ndarray) -> bool:
        if self.threshold_dbfs is None:
            return True
        ok = self.level_dbfs(samples) >= self.threshold_dbfs
        if not ok:
            self.skipped += 1
        return ok
