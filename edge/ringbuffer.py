"""The capture ring buffer, and the scheduler that cuts it into windows for the inference worker.

Two threads meet here and never wait on each other:

* the writer (the PortAudio callback, or a file/stdin reader thread) only copies frames into a preallocated array and
  advances a counter. No allocation of sample memory, no lock, no logging: a callback that blocks makes PortAudio drop
  audio, and a lock shared with a slow reader would do exactly that.
* the reader (WindowScheduler.pump, on the scheduler thread) copies what is new out of the ring, mixes it to mono,
  cuts windows with edge.windowing.Windower, and hands them to the inference worker through a bounded queue.

Losses are counted, never hidden: a reader that falls a whole ring behind loses the oldest frames (`overrun_frames`);
an inference worker that falls behind loses the oldest pending windows (`windows_dropped`); a last partial window at a
gap or at the end that would add under half a second of unheard audio is not analysed (`tails_dropped`, see
edge/windowing.py). Sources that are not paced
by a clock (a file read as fast as possible, a pipe on stdin) wait for room instead, so they lose nothing.

Time: every block belongs to a *segment*, one uninterrupted run of capture that starts at a known UTC wall-clock time.
A source opens a new segment when it (re)starts; the gap since the previous one advances the sample offset, so
`offset_s` stays "seconds since the source started" across reconnects, and a window never spans a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from edge.events import WindowInfo
from edge.windowing import Windower

logger = logging.getLogger(__name__)

_MAX_SEGMENTS = 64  # segments remembered by the ring: far more than can start within one ring's length


@dataclass(frozen=True)
class Chunk:
    """Frames read from the ring: (frames, channels) float32, all of one segment, contiguous."""

    data: np.ndarray
    offset: int  # sample offset of the first frame on the source's timeline
    utc: float  # wall-clock time (POSIX seconds) of the first frame
    segment: int


class RingBuffer:
    """Fixed-size multi-channel float32 ring with one writer and one reader."""

    def __init__(self, capacity_frames: int, channels: int, sample_rate: int):
        if capacity_frames <= 0 or channels <= 0 or sample_rate <= 0:
            raise ValueError("ring capacity, channels and sample rate must be positive")
        self.capacity = int(capacity_frames)
        self.channels = int(channels)
        self.sample_rate = int(sample_rate)
        self._buf = np.zeros((self.capacity, self.channels), dtype=np.float32)
        # Written by the writer only (a Python int store is atomic under the GIL); the reader only reads them.
        self.write_pos = 0  # frames ever written
        self._seg_pos = np.zeros(_MAX_SEGMENTS, dtype=np.int64)  # write_pos where each segment starts
        self._seg_offset = np.zeros(_MAX_SEGMENTS, dtype=np.int64)  # its sample offset on the source timeline
        self._seg_utc = np.zeros(_MAX_SEGMENTS, dtype=np.float64)
        self.segments = 0
        self.closed = False  # the writer will write no more (end of file, end of stdin)
        # Reader side.
        self.read_pos = 0
        self.overruns = 0  # times the reader found frames overwritten
        self.overrun_frames = 0

    # --- writer side -----------------------------------------------------------------------------------------------

    def begin_segment(self, utc: float, gap_frames: int = 0) -> None:
        """Mark the next written frame as the start of a new capture segment, first sample at wall time `utc`.

        `gap_frames`: frames that were not captured since the previous segment ended (a stalled device), so that
        sample offsets keep counting real time. Called by the writer before its first write of the segment.
        """
        n = self.segments
        if n:
            prev = (n - 1) % _MAX_SEGMENTS
            offset = int(self._seg_offset[prev]) + (self.write_pos - int(self._seg_pos[prev])) + max(0, int(gap_frames))
        else:
            offset = 0
        i = n % _MAX_SEGMENTS
        self._seg_pos[i] = self.write_pos
        self._seg_offset[i] = offset
        self._seg_utc[i] = utc
        self.segments = n + 1

    def write(self, block: np.ndarray) -> None:
        """Copy (frames, channels) float32 into the ring. The only thing the audio callback does."""
        n = block.shape[0]
        if n > self.capacity:  # a block larger than the ring: keep its newest frames
            block = block[n - self.capacity:]
            self.write_pos += n - self.capacity
            n = self.capacity
        start = self.write_pos % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start:start + first] = block[:first]
        if first < n:
            self._buf[:n - first] = block[first:]
        self.write_pos += n

    def free_frames(self) -> int:
        return self.capacity - (self.write_pos - self.read_pos)

    def wait_for_room(self, frames: int, stop: threading.Event, poll_s: float = 0.005) -> bool:
        """For unpaced writers (a file read as fast as possible, stdin): wait until `frames` fit without overwriting
        unread audio. False if `stop` was set first."""
        frames = min(frames, self.capacity)
        while self.free_frames() < frames:
            if stop.wait(poll_s):
                return False
        return True

    # --- reader side -----------------------------------------------------------------------------------------------

    def _segment_of(self, pos: int) -> int:
        """Index (count) of the segment holding write position `pos`: the last one that starts at or before it."""
        n = self.segments
        for k in range(n - 1, max(-1, n - 1 - _MAX_SEGMENTS), -1):
            if int(self._seg_pos[k % _MAX_SEGMENTS]) <= pos:
                return k
        return max(0, n - _MAX_SEGMENTS)

    def available(self) -> int:
        return self.write_pos - self.read_pos

    def read(self, max_frames: int) -> Chunk | None:
        """Copy up to `max_frames` unread frames of one segment out of the ring; None when there is nothing new."""
        w = self.write_pos
        start = self.read_pos
        if w - start > self.capacity:
            self._lost(w - self.capacity - start)
            start = w - self.capacity
        if w <= start or self.segments == 0:
            return None
        seg = self._segment_of(start)
        end = min(w, start + max_frames)
        if seg + 1 < self.segments:  # never cross into the next segment
            end = min(end, int(self._seg_pos[(seg + 1) % _MAX_SEGMENTS]))
        data = self._copy(start, end)
        # The writer may have lapped the reader during the copy: frames it overwrote are not trustworthy.
        overwritten = self.write_pos - self.capacity - start
        if overwritten > 0:
            self._lost(min(overwritten, end - start))
            data = data[min(overwritten, end - start):]
            start = min(start + overwritten, end)
        self.read_pos = end
        if data.shape[0] == 0:
            return None
        i = seg % _MAX_SEGMENTS
        seg_pos = int(self._seg_pos[i])
        offset = int(self._seg_offset[i]) + (start - seg_pos)
        utc = float(self._seg_utc[i]) + (start - seg_pos) / self.sample_rate
        return Chunk(data=data, offset=offset, utc=utc, segment=seg)

    def _copy(self, start: int, end: int) -> np.ndarray:
        n = end - start
        a = start % self.capacity
        first = min(n, self.capacity - a)
        if first == n:
            return self._buf[a:a + n].copy()
        return np.concatenate([self._buf[a:], self._buf[:n - first]])

    def _lost(self, frames: int) -> None:
        self.overruns += 1
        self.overrun_frames += frames


@dataclass(frozen=True)
class PendingWindow:
    samples: np.ndarray  # mono float32 at `sample_rate`
    sample_rate: int
    info: WindowInfo
    queued_monotonic: float


class WindowScheduler:
    """Cuts the ring's audio into windows and queues them for the inference worker, oldest dropped when full.

    `lossless=True` (unpaced sources) makes `pump` leave audio in the ring while the queue is full instead, so the
    writer waits for room and nothing is dropped.
    """

    def __init__(self, ring: RingBuffer, window_s: float, hop_s: float, max_pending: int, lossless: bool = False):
        self.ring = ring
        self.window_s, self.hop_s = float(window_s), float(hop_s)
        self.max_pending = int(max_pending)
        self.lossless = lossless
        self._pending: deque[PendingWindow] = deque()
        self._cond = threading.Condition()
        self._windower: Windower | None = None
        self._run_offset = 0  # source offset of the current windower's sample 0
        self._run_utc = 0.0
        self._run_segment = -1
        self._next_offset = 0
        self._finished = False
        self.windows_cut = 0
        self.windows_dropped = 0
        self.gaps_split = 0  # windowing restarted at a discontinuity (source gap or ring overrun)
        # Tails too short to analyse (edge.windowing.MIN_TAIL_SECONDS of unheard audio) at a gap or the end.
        self.tails_dropped = 0
        self.tail_frames_dropped = 0

    # --- scheduler thread ----------------------------------------------------------------------------------------

    def pump(self, max_frames: int | None = None) -> int:
        """Move what the ring holds into windows. Returns the frames consumed. Call it repeatedly."""
        if max_frames is None:
            max_frames = max(1, self.ring.sample_rate // 2)
        consumed = 0
        while True:
            if self.lossless and self.pending() >= self.max_pending:
                break
            chunk = self.ring.read(max_frames)
            if chunk is None:
                break
            consumed += chunk.data.shape[0]
            self._feed(chunk)
        if self.ring.closed and self.ring.available() == 0 and not self._finished:
            self._end_run()
            with self._cond:
                self._finished = True
                self._cond.notify_all()
        return consumed

    def _feed(self, chunk: Chunk) -> None:
        if self._windower is None or chunk.segment != self._run_segment or chunk.offset != self._next_offset:
            if self._windower is not None:
                self.gaps_split += 1
                logger.info("audio discontinuity at %.3f s (expected %.3f s): windowing restarts there",
                            chunk.offset / self.ring.sample_rate, self._next_offset / self.ring.sample_rate)
            self._end_run()
            self._windower = Windower(self.window_s, self.hop_s, self.ring.sample_rate)
            self._run_offset, self._run_utc, self._run_segment = chunk.offset, chunk.utc, chunk.segment
        mono = chunk.data.mean(axis=1, dtype=np.float32) if chunk.data.shape[1] > 1 else chunk.data[:, 0]
        self._next_offset = chunk.offset + chunk.data.shape[0]
        for samples, start in self._windower.push(mono):
            self._queue(samples, start)

    def _end_run(self) -> None:
        """The stream stops here (gap, overrun, end of source): the unheard tail becomes a last, shorter window."""
        if self._windower is not None:
            tail = self._windower.flush()
            if tail is not None and tail[0].size:
                self._queue(*tail)
            self.tails_dropped += self._windower.tails_dropped
            self.tail_frames_dropped += self._windower.tail_samples_dropped
        self._windower = None

    def _queue(self, samples: np.ndarray, start: int) -> None:
        sr = self.ring.sample_rate
        offset = self._run_offset + start
        info = WindowInfo(index=self.windows_cut, offset_s=offset / sr, duration_s=samples.size / sr,
                          start_utc=datetime.fromtimestamp(self._run_utc + start / sr, tz=timezone.utc))
        self.windows_cut += 1
        item = PendingWindow(samples=samples, sample_rate=sr, info=info, queued_monotonic=time.monotonic())
        with self._cond:
            # Lossless: pump() stops reading while the queue is full, so it overshoots by at most one chunk's windows.
            if not self.lossless and len(self._pending) >= self.max_pending:
                old = self._pending.popleft()
                self.windows_dropped += 1
                logger.warning("inference is behind: dropped window %d (%.1f s) unprocessed; %d dropped so far",
                               old.info.index, old.info.offset_s, self.windows_dropped)
            self._pending.append(item)
            self._cond.notify_all()

    # --- inference worker ---------------------------------------------------------------------------------------

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def get(self, timeout: float) -> PendingWindow | None:
        """The oldest pending window, waiting up to `timeout`; None when none came."""
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            return self._pending.popleft() if self._pending else None

    @property
    def finished(self) -> bool:
        """The source ended and every window of it has been handed out."""
        with self._cond:
            return self._finished and not self._pending
