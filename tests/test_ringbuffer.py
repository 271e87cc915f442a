"""The capture ring and the window scheduler: nothing lost silently, losses counted, timestamps from the capture
clock, windows never spanning a gap, and a bounded backlog."""

from __future__ import annotations

import threading
from datetime import timezone

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.ringbuffer import RingBuffer, WindowScheduler

SR = 100  # small rates keep the arithmetic readable


def ramp(start: int, n: int, channels: int = 1) -> np.ndarray:
    return np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None], channels, axis=1)


def read_all(ring: RingBuffer, max_frames: int = 10**9):
    out = []
    while (c := ring.read(max_frames)) is not None:
        out.append(c)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=30), st.integers(1, 50))
def test_ring_returns_every_frame_in_order_when_the_reader_keeps_up(blocks, read_size):
    ring = RingBuffer(64, 2, SR)
    ring.begin_segment(1000.0)
    got, pos = [], 0
    for n in blocks:
        n = min(n, 64)
        ring.write(ramp(pos, n, 2))
        pos += n
        got += [c.data for c in read_all(ring, read_size)]
    data = np.concatenate(got)
    assert np.array_equal(data[:, 0], np.arange(pos, dtype=np.float32))
    assert ring.overruns == 0


def test_overrun_keeps_the_newest_and_counts_the_lost_frames():
    ring = RingBuffer(50, 1, SR)
    ring.begin_segment(0.0)
    for i in range(4):
        ring.write(ramp(i * 30, 30))  # 120 frames into a ring of 50, nothing read
    chunks = read_all(ring)
    data = np.concatenate([c.data for c in chunks])[:, 0]
    assert np.array_equal(data, np.arange(70, 120, dtype=np.float32))
    assert ring.overruns == 1 and ring.overrun_frames == 70
    assert chunks[0].offset == 70 and chunks[0].utc == 0.7


def test_write_does_not_allocate_sample_memory():
    """The callback's write copies into the preallocated array: the buffer object never changes."""
    ring = RingBuffer(1000, 2, SR)
    buf = ring._buf
    before = buf.__array_interface__["data"][0]
    for i in range(50):
        ring.write(ramp(i * 37, 37, 2))
    assert ring._buf is buf and buf.__array_interface__["data"][0] == before


def test_segments_carry_utc_and_offsets_across_a_gap():
    ring = RingBuffer(1000, 1, SR)
    ring.begin_segment(1000.0)
    ring.write(ramp(0, 150))
    ring.begin_segment(1010.0, gap_frames=850)  # 8.5 s of nothing, then capture resumes
    ring.write(ramp(0, 50))
    chunks = read_all(ring)
    assert [(c.offset, c.utc, c.segment, len(c.data)) for c in chunks] == [(0, 1000.0, 0, 150),
                                                                           (1000, 1010.0, 1, 50)]


def _scheduler(window_s=1.0, hop_s=0.5, max_pending=100, lossless=False, capacity=10_000):
    ring = RingBuffer(capacity, 1, SR)
    return ring, WindowScheduler(ring, window_s, hop_s, max_pending, lossless=lossless)


def _drain(sched):
    out = []
    while (w := sched.get(0)) is not None:
        out.append(w)
    return out


def test_windows_are_cut_at_the_hop_with_capture_timestamps():
    ring, sched = _scheduler()
    ring.begin_segment(1_700_000_000.0)
    ring.write(ramp(0, 300))
    sched.pump()
    wins = _drain(sched)
    assert [w.info.offset_s for w in wins] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [w.info.index for w in wins] == [0, 1, 2, 3, 4]
    assert all(w.info.duration_s == 1.0 and w.samples.size == 100 for w in wins)
    assert wins[2].samples[0] == 100.0
    assert wins[3].info.start_utc.timestamp() == 1_700_000_001.5
    assert wins[3].info.start_utc.tzinfo == timezone.utc


def test_a_window_never_spans_a_gap():
    ring, sched = _scheduler()
    ring.begin_segment(100.0)
    ring.write(ramp(0, 130))  # 1.3 s: a window at 0.0; the tail 0.5-1.3 adds only 0.3 s unheard: dropped, counted
    ring.begin_segment(110.0, gap_frames=870)
    ring.write(ramp(0, 100))
    sched.pump()
    wins = _drain(sched)
    assert [(w.info.offset_s, w.info.duration_s) for w in wins] == [(0.0, 1.0), (10.0, 1.0)]
    assert wins[1].info.start_utc.timestamp() == 110.0
    assert sched.gaps_split == 1
    assert (sched.tails_dropped, sched.tail_frames_dropped) == (1, 30)


def test_a_tail_with_enough_unheard_audio_is_a_last_shorter_window():
    ring, sched = _scheduler(window_s=2.0, hop_s=2.0)
    ring.begin_segment(0.0)
    ring.write(ramp(0, 260))  # 2.6 s: a window at 0.0, then 0.6 s unheard, at least MIN_TAIL_SECONDS: kept
    ring.closed = True
    sched.pump()
    wins = _drain(sched)
    assert [(w.info.offset_s, w.info.duration_s) for w in wins] == [(0.0, 2.0), (2.0, 0.6)]
    assert sched.tails_dropped == 0


def test_the_backlog_is_bounded_and_drops_the_oldest():
    ring, sched = _scheduler(max_pending=3)
    ring.begin_segment(0.0)
    ring.write(ramp(0, 500))  # 9 windows
    sched.pump()
    wins = _drain(sched)
    assert sched.windows_cut == 9 and sched.windows_dropped == 6
    assert [w.info.index for w in wins] == [6, 7, 8]


def test_lossless_mode_waits_instead_of_dropping():
    """An unpaced source (file as fast as possible) blocks on a full ring while the queue is full: nothing drops."""
    ring, sched = _scheduler(max_pending=2, lossless=True, capacity=120)
    stop = threading.Event()
    total = 1000

    def writer():
        pos = 0
        ring.begin_segment(0.0)
        while pos < total:
            n = min(30, total - pos)
            assert ring.wait_for_room(n, stop)
            ring.write(ramp(pos, n))
            pos += n
        ring.closed = True

    t = threading.Thread(target=writer)
    t.start()
    got = []
    while not sched.finished:
        sched.pump()
        w = sched.get(0.01)
        if w is not None:
            got.append(w)
    t.join(5)
    assert sched.windows_dropped == 0 and ring.overruns == 0
    assert [w.info.offset_s for w in got] == [i * 0.5 for i in range(19)]
    assert np.array_equal(got[-1].samples, np.arange(900, 1000, dtype=np.float32))


def test_end_of_source_flushes_the_tail_and_finishes():
    ring, sched = _scheduler()
    ring.begin_segment(0.0)
    ring.write(ramp(0, 120))
    ring.closed = True
    sched.pump()
    wins = _drain(sched)
    # 1.2 s: a window at 0.0; the tail adds 0.2 s unheard, under MIN_TAIL_SECONDS: dropped and counted.
    assert [(w.info.offset_s, w.info.duration_s) for w in wins] == [(0.0, 1.0)]
    assert sched.tails_dropped == 1
    assert sched.finished


def test_multichannel_is_mixed_to_mono():
    ring = RingBuffer(1000, 2, SR)
    sched = WindowScheduler(ring, 1.0, 1.0, 10)
    ring.begin_segment(0.0)
    block = np.stack([np.ones(100, np.float32), np.zeros(100, np.float32)], axis=1)
    ring.write(block)
    sched.pump()
    (w,) = _drain(sched)
    assert w.samples.shape == (100,) and np.allclose(w.samples, 0.5)
