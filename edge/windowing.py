"""Cutting a stream into model windows, and a cheap activity gate that skips silence before the model runs.

Windows start every `hop_s` seconds and last `window_s`. The last partial window of a finite stream is kept (the
front end pads it, as the reference pads short clips) rather than dropped, so the tail of a recording is heard: the
reference CLI drops it (MODEL.md, known bugs). Except when it would add less than MIN_TAIL_SECONDS of audio no earlier
window held: upstream refuses clips under 0.5 s (NatureLM/infer.py), a few milliseconds padded to a 10 s clip say
nothing, and a tail shorter than one fbank frame (25 ms: a 10.01 s file with hop = window) would fail the front end.
Such a tail is dropped, logged and counted (`tails_dropped`, `tail_samples_dropped`), never an error. A stream shorter
than one window is its own only window and is always passed on (the front end judges whether it is long enough).
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

#: A last partial window must add at least this much unheard audio to be analysed (upstream's minimum clip length).
MIN_TAIL_SECONDS = 0.5


class Windower:
    """Accumulates mono blocks and yields (samples, start_sample) for each complete window, in order.

    `push` takes blocks of any size; memory stays bounded by one window plus one block.
    """

    def __init__(self, window_s: float, hop_s: float, sample_rate: int, min_tail_s: float = MIN_TAIL_SECONDS,
                 name: str | None = None):
        if window_s <= 0 or hop_s <= 0:
            raise ValueError("window and hop must be positive")
        if hop_s > window_s:
            # Gaps between windows would leave audio unheard; a field recorder should never do that silently.
            raise ValueError(f"hop {hop_s} s is longer than the window {window_s} s: audio between windows is lost")
        self.sample_rate = int(sample_rate)
        self.window = round(window_s * sample_rate)
        self.hop = round(hop_s * sample_rate)
        self.min_tail = round(min_tail_s * sample_rate)
        self.name = name  # for the log line of a dropped tail
        self.tails_dropped = 0
        self.tail_samples_dropped = 0
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
        """The last partial window (shorter than `window`), if audio after the last complete window is unheard and
        there is enough of it (MIN_TAIL_SECONDS; see the module docstring)."""
        if self._total <= self._emitted_to or self._next >= self._total:
            return None
        unheard = self._total - self._emitted_to
        if self._emitted_to > 0 and unheard < self.min_tail:
            self.tails_dropped += 1
            self.tail_samples_dropped += unheard
            logger.info("%slast %.3f s not analysed: a last window must add at least %g s of audio",
                        f"{self.name}: " if self.name else "", unheard / self.sample_rate,
                        self.min_tail / self.sample_rate)
            self._emitted_to = self._next = self._total
            return None
        a = self._next - self._buf_start
        samples = self._buf[a:].copy()
        self._emitted_to = self._total
        self._next = self._total
        return samples, self._total - samples.size


def window_count(total_samples: int, window: int, hop: int, min_tail: int = 0) -> int:
    """How many windows Windower yields (complete + the padded last one, when it adds at least `min_tail` samples)
    for a stream of `total_samples`."""
    if total_samples <= 0:
        return 0
    if total_samples < window:
        return 1
    complete = (total_samples - window) // hop + 1
    covered = (complete - 1) * hop + window
    return complete + (1 if total_samples - covered >= max(1, min_tail) else 0)


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
