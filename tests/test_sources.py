"""Audio sources: device choice, file pacing and looping, raw PCM on stdin, and a microphone that stops delivering
frames: it is reopened with backoff and the gap is counted."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.config import FileConfig, MicConfig, SourceConfig, StdinConfig
from edge.errors import AudioError
from edge.ringbuffer import RingBuffer
from edge.sources import FileSource, MicSource, StdinSource, format_devices, input_devices, resolve_device

FAKE_SD = Path(__file__).parent / "fake_sounddevice" / "sounddevice.py"


@pytest.fixture
def fake_sd(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("sounddevice", FAKE_SD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "sounddevice", mod)
    control = tmp_path / "sd"
    control.mkdir()
    monkeypatch.setenv("FAKE_SD_CONTROL", str(control))
    return control


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_devices_are_chosen_by_name_substring_or_index(fake_sd):
    assert [d["index"] for d in input_devices()] == [1]  # the output-only card is not listed
    assert resolve_device("usb pnp")["index"] == 1
    assert resolve_device(1)["samplerate"] == 16000
    assert resolve_device(None)["index"] == 1
    with pytest.raises(AudioError, match="no input device whose name contains 'Zoom'"):
        resolve_device("Zoom")
    with pytest.raises(AudioError, match="no input device with index 0"):
        resolve_device(0)
    assert "USB PnP Sound Device" in format_devices(input_devices())


def _mic_cfg(**kw) -> SourceConfig:
    return SourceConfig(type="mic", mic=MicConfig(device="USB", block_s=0.02), stall_timeout_s=0.4,
                        reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.4, **kw)


def test_microphone_stall_reopens_the_device_and_counts_the_gap(fake_sd):
    src = MicSource(_mic_cfg())
    src.open()
    assert (src.sample_rate, src.channels, src.name) == (16000, 1, "mic:USB PnP Sound Device: Audio (hw:1,0)")
    ring = RingBuffer(16000 * 5, 1, 16000)
    src.start(ring)
    try:
        assert _wait(lambda: ring.write_pos > 8000)
        (fake_sd / "stall").touch()
        assert _wait(lambda: src.stalled_since is not None)
        assert not src.frames_within(0.3)
        assert src.health()["stalled"] is True
        time.sleep(0.5)  # a stall that lasts: the device stays dead while the flag is there
        (fake_sd / "stall").unlink()
        assert _wait(lambda: src.stalled_since is None and src.gaps == 1)
        assert src.reconnects >= 1 and src.frames_within(0.3)
        h = src.health()
        assert h["gaps"] == 1 and h["gap_s"] >= 0.8 and h["reconnects"] == src.reconnects
        # The new segment's offset counts the gap: the timeline stays "seconds since the start".
        assert ring.segments >= 2
        seg = (ring.segments - 1) % 64
        gap_frames = int(ring._seg_offset[seg]) - int(ring._seg_pos[seg])
        assert gap_frames >= 0.7 * 16000
    finally:
        src.stop()
    assert len((fake_sd / "opened").read_text().splitlines()) >= 2


def test_unplugged_microphone_is_retried_until_it_returns(fake_sd):
    src = MicSource(_mic_cfg())
    src.open()
    ring = RingBuffer(16000 * 5, 1, 16000)
    (fake_sd / "absent").touch()
    src.start(ring)
    try:
        time.sleep(0.5)
        assert ring.write_pos == 0
        (fake_sd / "absent").unlink()
        assert _wait(lambda: ring.write_pos > 1600)
    finally:
        src.stop()


def _wav(path: Path, seconds: float, sr: int = 8000, channels: int = 1) -> Path:
    x = np.tile(np.linspace(-0.5, 0.5, int(sr * seconds), dtype=np.float32)[:, None], (1, channels))
    sf.write(str(path), x, sr)
    return path


def test_file_source_in_real_time(tmp_path):
    path = _wav(tmp_path / "a.wav", 0.6)
    src = FileSource(SourceConfig(type="file", file=FileConfig(path=path, realtime=True)))
    src.open()
    assert src.paced
    ring = RingBuffer(8000 * 2, 1, 8000)
    t0 = time.monotonic()
    src.start(ring)
    assert _wait(lambda: ring.closed, 5)
    assert time.monotonic() - t0 >= 0.5
    assert ring.write_pos == 4800


def test_file_source_fast_waits_for_room_and_loops(tmp_path):
    path = _wav(tmp_path / "a.wav", 1.0, channels=2)
    src = FileSource(SourceConfig(type="file", file=FileConfig(path=path, realtime=False, loop=True)))
    src.open()
    assert not src.paced and src.channels == 2
    ring = RingBuffer(8000 * 3, 2, 8000)  # smaller than what the loop will produce
    src.start(ring)
    try:
        got = 0
        while got < 8000 * 10:
            c = ring.read(4000)
            if c is None:
                time.sleep(0.001)
                continue
            got += c.data.shape[0]
        assert ring.overruns == 0 and not ring.closed
        assert src.stalled_since is None  # waiting for room is not a stall
    finally:
        src.stop()


def test_stdin_raw_pcm_with_a_stall(tmp_path):
    r, w = os.pipe()
    cfg = SourceConfig(type="stdin", stdin=StdinConfig(samplerate=8000, channels=2, format="s16le"),
                       stall_timeout_s=0.3)
    with os.fdopen(r, "rb") as rf:
        src = StdinSource(cfg, stream=rf)
        src.open()
        ring = RingBuffer(8000 * 10, 2, 8000)
        src.start(ring)
        # A live producer (arecord) writes in real time: 0.25 s of audio, then nothing for a while.
        pcm = (np.arange(2000 * 2, dtype=np.int16) % 1000).reshape(-1, 2)
        os.write(w, pcm.tobytes()[:3001])  # a cut in the middle of a frame
        os.write(w, pcm.tobytes()[3001:])
        assert _wait(lambda: ring.write_pos == 2000)
        assert _wait(lambda: src.stalled_since is not None, 3)
        time.sleep(0.3)
        os.write(w, pcm.tobytes())
        assert _wait(lambda: ring.write_pos == 4000 and src.gaps == 1)
        os.close(w)
        assert _wait(lambda: ring.closed)
        src.stop()
    chunks = []
    while (c := ring.read(100000)) is not None:
        chunks.append(c)
    assert np.allclose(chunks[0].data[:, 1] * 32768, pcm[:, 1])
    # Resumed in a new segment whose offset counts the silent time (>= 0.3 + 0.3 s after a write of 0.25 s).
    assert len(chunks) == 2 and chunks[1].segment == 1 and chunks[1].offset >= 2000 + 0.3 * 8000
    assert src.health()["gap_s"] >= 0.4

