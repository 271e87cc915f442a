"""Audio sources that feed the ring buffer: a microphone (PortAudio via sounddevice), a file, raw PCM on stdin.

Each source writes (frames, channels) float32 blocks into the RingBuffer at its native rate (the front end resamples
each window; resampling in the capture path would cost CPU in the one place that must never be late) and opens a
ring *segment* whenever capture (re)starts, stamped with the UTC wall-clock time of its first sample.

A source that stops delivering frames for `stall_timeout_s` is *stalled*: the microphone is closed and reopened
with exponential backoff (a USB microphone that was unplugged comes back under a new PortAudio index, so the device
is looked up again by name each time); stdin is waited on. The stall is a *gap*: counted, its length summed, and
reported in health. Sources that are not paced by a clock (a file read as fast as possible, stdin) wait for room in
the ring rather than overwrite audio, and such waiting is not a stall.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import numpy as np

from edge.config import SourceConfig
from edge.errors import AudioError
from edge.ringbuffer import RingBuffer

logger = logging.getLogger(__name__)

_POLL_S = 0.1


class AudioSource:
    """Base: stall detection and gap accounting shared by every source. Subclasses implement `_run`."""

    #: True when a clock paces the frames (a microphone, a file in real time): the reader must keep up or lose audio.
    paced = True

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.sample_rate = 0
        self.channels = 0
        self.ring: RingBuffer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Accounting (read by health from other threads; plain ints/floats, written by one thread each).
        self.gaps = 0
        self.gap_seconds = 0.0
        self.reconnects = 0
        self.input_overflows = 0
        self.stalled_since: float | None = None  # monotonic time of the last frame before the current stall
        self.waiting_for_room = False
        self.ended = False
        self._last_progress = time.monotonic()
        self._last_pos = 0
        self._seg_mono = 0.0  # monotonic time of the current segment's first sample
        self._seg_start_pos = 0

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Find out sample rate and channels (before the ring is allocated). May raise AudioError."""
        raise NotImplementedError

    def start(self, ring: RingBuffer) -> None:
        self.ring = ring
        self._last_progress = time.monotonic()
        for target, name in ((self._run, "source"), (self._monitor, "source-monitor")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2.0)

    def _run(self) -> None:
        raise NotImplementedError

    # --- time ------------------------------------------------------------------------------------------------------

    def _begin_segment(self) -> None:
        """A new run of capture starts now. The frames missing since the last one became the gap."""
        ring = self.ring
        now_mono, now_utc = time.monotonic(), time.time()
        gap = 0
        if ring.segments:
            expected = self._seg_mono + (ring.write_pos - self._seg_start_pos) / self.sample_rate
            gap = max(0, round((now_mono - expected) * self.sample_rate))
        ring.begin_segment(now_utc, gap_frames=gap)
        self._seg_mono, self._seg_start_pos = now_mono, ring.write_pos

    # --- stalls ----------------------------------------------------------------------------------------------------

    def frames_within(self, seconds: float) -> bool:
        """Liveness for the watchdog: frames arrived within `seconds`, or the source waits only for the reader."""
        return self.waiting_for_room or self.ended or (time.monotonic() - self._last_progress) <= seconds

    def _monitor(self) -> None:
        retry_at, delay = 0.0, 0.0
        while not self._stop.wait(_POLL_S):
            pos = self.ring.write_pos
            now = time.monotonic()
            if pos != self._last_pos or self.waiting_for_room or self.ended:
                if pos != self._last_pos and self.stalled_since is not None:
                    gap = now - self.stalled_since
                    self.gaps += 1
                    self.gap_seconds += gap
                    logger.warning("audio from %s resumed after a %.1f s gap (%d gaps, %.1f s in all)",
                                   self.name, gap, self.gaps, self.gap_seconds)
                    self.stalled_since = None
                self._last_pos, self._last_progress = pos, now
            elif self.stalled_since is None and now - self._last_progress >= self.cfg.stall_timeout_s:
                self.stalled_since = self._last_progress
                logger.warning("no audio frames from %s for %.1f s: %s", self.name, now - self._last_progress,
                               self._stall_action())
                self._on_stall()
                delay = max(self.cfg.stall_timeout_s, self.cfg.reconnect_min_delay_s)
                retry_at = now + delay
            elif self.stalled_since is not None and now >= retry_at:
                # Still nothing after the last attempt: try again, backing off up to reconnect_max_delay_s.
                self._on_stall()
                delay = min(2 * delay, max(self.cfg.reconnect_max_delay_s, self.cfg.stall_timeout_s))
                retry_at = now + delay

    def _stall_action(self) -> str:
        return "waiting for more"

    def _on_stall(self) -> None:
        """Called on the monitor thread when a stall begins, and again, backing off, while it lasts."""

    def health(self) -> dict:
        stalled = self.stalled_since is not None
        current = time.monotonic() - self.stalled_since if stalled else 0.0
        return {
            "name": self.name, "sample_rate": self.sample_rate, "channels": self.channels,
            "stalled": stalled, "gaps": self.gaps + (1 if stalled else 0),
            "gap_s": round(self.gap_seconds + current, 3), "reconnects": self.reconnects,
            "input_overflows": self.input_overflows, "ended": self.ended,
        }


# --- microphone ---------------------------------------------------------------------------------------------------


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:  # the module loads, PortAudio does not
        raise AudioError(f"PortAudio is not available ({e}); install libportaudio2") from None
    return sounddevice


def input_devices() -> list[dict]:
    """Every PortAudio device with input channels: index, name, channels, native rate, host API, default."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default_in = sd.default.device[0]
        apis = sd.query_hostapis()
    except sd.PortAudioError as e:
        raise AudioError(f"cannot list audio devices ({e})") from None
    out = []
    for i, d in enumerate(devices):
        if d["max_input_channels"] > 0:
            out.append({"index": i, "name": d["name"], "channels": int(d["max_input_channels"]),
                        "samplerate": int(d["default_samplerate"]),
                        "hostapi": apis[d["hostapi"]]["name"] if d["hostapi"] < len(apis) else "",
                        "default": i == default_in})
    return out


def resolve_device(spec) -> dict:
    """The input device a config names: an index, a case-insensitive name substring, or None for the default."""
    devices = input_devices()
    if not devices:
        raise AudioError("no audio input devices found")
    if spec is None:
        chosen = [d for d in devices if d["default"]] or devices[:1]
        return chosen[0]
    if isinstance(spec, int):
        for d in devices:
            if d["index"] == spec:
                return d
        raise AudioError(f"no input device with index {spec} (inputs: "
                         f"{'; '.join(str(d['index']) + ' ' + d['name'] for d in devices)})")
    matches = [d for d in devices if spec.lower() in d["name"].lower()]
    exact = [d for d in matches if d["name"].lower() == spec.lower()]
    if exact or matches:
        return (exact or matches)[0]
    raise AudioError(f"no input device whose name contains {spec!r} (inputs: "
                     f"{'; '.join(d['name'] for d in devices)})")


class MicSource(AudioSource):
    """PortAudio capture. The callback copies into the ring and nothing else."""

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self._stream = None
        self._reopen = threading.Event()

    def open(self) -> None:
        mic = self.cfg.mic
        dev = resolve_device(mic.device)
        self.device_name = dev["name"]
        self.sample_rate = mic.samplerate or dev["samplerate"]
        if mic.channels > dev["channels"]:
            raise AudioError(f"input device {dev['name']!r} has {dev['channels']} channel(s); "
                             f"source.mic.channels is {mic.channels}")
        self.channels = mic.channels
        self.name = f"mic:{dev['name']}"
        logger.info("microphone %r (index %d), %d Hz, %d channel(s)", dev["name"], dev["index"], self.sample_rate,
                    self.channels)

    def _callback(self, indata, frames, time_info, status) -> None:
        # Runs on PortAudio's thread: copy and count, nothing that can block or allocate sample memory.
        if status:
            self.input_overflows += 1
        self.ring.write(indata)

    def _open_stream(self):
        sd = _sounddevice()
        dev = resolve_device(self.cfg.mic.device)
        stream = sd.InputStream(device=dev["index"], samplerate=self.sample_rate, channels=self.channels,
                                dtype="float32", blocksize=max(1, int(self.sample_rate * self.cfg.mic.block_s)),
                                callback=self._callback)
        self._begin_segment()
        stream.start()
        return stream, dev

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort(ignore_errors=True)
                stream.close(ignore_errors=True)
            except _sounddevice().PortAudioError as e:  # a vanished device can fail to close; it is gone anyway
                logger.debug("closing the stream failed: %s", e)

    def _refresh_portaudio(self) -> None:
        # PortAudio lists devices once, at initialisation: a re-plugged USB microphone is only seen after a restart.
        sd = _sounddevice()
        if hasattr(sd, "_terminate") and hasattr(sd, "_initialize"):
            try:
                sd._terminate()
                sd._initialize()
            except sd.PortAudioError as e:
                logger.debug("PortAudio re-initialisation failed: %s", e)

    def _run(self) -> None:
        delay = self.cfg.reconnect_min_delay_s
        first = True
        opened_at = 0  # ring position when the current stream opened
        while not self._stop.is_set():
            if self._stream is None:
                if not first:
                    self._refresh_portaudio()
                try:
                    self._stream, dev = self._open_stream()
                except (AudioError, _sounddevice().PortAudioError, ValueError) as e:
                    logger.warning("cannot open microphone %s (%s); retrying in %.1f s", self.cfg.mic.device or
                                   "(default)", str(e).splitlines()[0], delay)
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, self.cfg.reconnect_max_delay_s)
                    continue
                if not first:
                    self.reconnects += 1
                    logger.info("microphone %r reopened (reconnect %d); waiting for frames", dev["name"],
                                self.reconnects)
                first = False
                opened_at = self.ring.write_pos
            # Wait until the monitor reports a stall (it backs off its own retries) or the stream ends by itself.
            self._reopen.wait(_POLL_S)
            ended = self._stream is not None and not self._stream.active
            if self._reopen.is_set() or ended:
                self._reopen.clear()
                self._close_stream()
                if self.ring.write_pos != opened_at:  # it worked for a while: start the backoff afresh
                    delay = self.cfg.reconnect_min_delay_s
                if not ended:
                    continue
                logger.warning("the microphone stream ended (device removed?); reopening in %.1f s", delay)
                # A stream that opens and ends at once must not make this a busy loop.
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.cfg.reconnect_max_delay_s)
        self._close_stream()

    def _stall_action(self) -> str:
        return "reopening the device"

    def _on_stall(self) -> None:
        self._reopen.set()

    def stop(self) -> None:
        self._stop.set()
        self._reopen.set()
        super().stop()


# --- file -----------------------------------------------------------------------------------------------------------


class FileSource(AudioSource):
    """A recording, paced in real time (a stand-in for a microphone) or as fast as possible, optionally looped."""

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg)
        self.paced = cfg.file.realtime

    def open(self) -> None:
        info = probe_file(self.cfg.file.path)
        self.sample_rate, self.channels = info.sample_rate, info.channels

    def _run(self) -> None:
        import soundfile as sf

        fcfg = self.cfg.file
        block = max(1, int(self.sample_rate * (0.1 if fcfg.realtime else 1.0)))
        written = 0
        t0 = time.monotonic()
        try:
            with sf.SoundFile(str(fcfg.path)) as f:
                self._begin_segment()
                while not self._stop.is_set():
                    data = f.read(block, dtype="float32", always_2d=True)
                    if data.shape[0] == 0:
                        if not fcfg.loop:
                            break
                        f.seek(0)  # the timeline continues: a loop is one long recording
                        continue
                    if fcfg.realtime:
                        # Pace by the monotonic clock, not by sleeping per block, so the rate does not drift.
                        ahead = t0 + (written + data.shape[0]) / self.sample_rate - time.monotonic()
                        if ahead > 0 and self._stop.wait(ahead):
                            break
                    else:
                        self.waiting_for_room = True
                        ok = self.ring.wait_for_room(data.shape[0], self._stop)
                        self.waiting_for_room = False
                        if not ok:
                            break
                    self.ring.write(data)
                    written += data.shape[0]
        except (RuntimeError, sf.LibsndfileError) as e:
            logger.error("reading %s failed: %s", fcfg.path, str(e).splitlines()[0])
        finally:
            self.ended = True
            self.ring.closed = True
            logger.info("file source %s ended after %.1f s of audio", fcfg.path, written / self.sample_rate)


# --- stdin ---------------------------------------------------------------------------------------------------------

_FORMATS = {"s16le": ("<i2", 32768.0), "s32le": ("<i4", 2147483648.0), "f32le": ("<f4", 1.0)}


class StdinSource(AudioSource):
    """Raw interleaved PCM on standard input (`arecord -t raw ... | naturelm-edge run ...`).

    A pipe is not paced by us: when the ring is full the reader stops reading, and the writer on the other side of
    the pipe waits. After a stall, capture resumes in a new segment stamped with the time the data came back.
    """

    paced = False

    def __init__(self, cfg: SourceConfig, stream=None):
        super().__init__(cfg)
        self._fd = (stream or sys.stdin.buffer).fileno()
        self._resume_segment = True  # the first segment starts with the first data, not when the daemon starts

    def open(self) -> None:
        s = self.cfg.stdin
        self.sample_rate, self.channels = s.samplerate, s.channels
        self._dtype, self._scale = _FORMATS[s.format]

    def _on_stall(self) -> None:
        self._resume_segment = True

    def _run(self) -> None:
        frame_bytes = np.dtype(self._dtype).itemsize * self.channels
        want = max(1, int(self.sample_rate * 0.1)) * frame_bytes
        rest = b""
        try:
            while not self._stop.is_set():
                try:
                    data = os.read(self._fd, want)
                except InterruptedError:
                    continue
                except OSError as e:
                    logger.error("reading stdin failed: %s", e)
                    break
                if not data:
                    break
                data = rest + data
                usable = len(data) - len(data) % frame_bytes
                rest = data[usable:]
                if not usable:
                    continue
                pcm = np.frombuffer(data[:usable], dtype=self._dtype).reshape(-1, self.channels)
                block = pcm.astype(np.float32) / np.float32(self._scale) if self._scale != 1.0 else pcm.astype(
                    np.float32)
                if self._resume_segment:
                    self._resume_segment = False
                    self._begin_segment()
                self.waiting_for_room = True
                ok = self.ring.wait_for_room(block.shape[0], self._stop)
                self.waiting_for_room = False
                if not ok:
                    break
                self.ring.write(block)
        finally:
            self.ended = True
            self.ring.closed = True
            logger.info("stdin ended")


def probe_file(path):
    """The file's rate, channels and length; AudioError naming it when it is not audio libsndfile reads, or empty."""
    from edge.audio_io import probe

    info = probe(path)
    if info.frames == 0:
        raise AudioError(f"{info.path}: holds no audio frames")
    return info


def probe_source(cfg: SourceConfig) -> None:
    """Check what can be checked of a source without starting it (`check-config` and the daemon's start): a file
    source's file must be audio. A microphone may be plugged in later and stdin is not there yet: nothing to check."""
    if cfg.type == "file":
        probe_file(cfg.file.path)


def make_source(cfg: SourceConfig) -> AudioSource:
    return {"mic": MicSource, "file": FileSource, "stdin": StdinSource}[cfg.type](cfg)


def format_devices(devices: list[dict]) -> str:
    """The `naturelm-edge devices` table."""
    if not devices:
        return "no audio input devices found (is a microphone connected, and is the user in the 'audio' group?)"
    lines = [f"{'':2}{'index':>5}  {'channels':>8}  {'rate':>6}  {'host API':<12}  name"]
    for d in devices:
        lines.append(f"{'*' if d['default'] else ' ':2}{d['index']:>5}  {d['channels']:>8}  {d['samplerate']:>6}  "
                     f"{d['hostapi'][:12]:<12}  {d['name']}")
    lines.append("(* = default input; use the index or a part of the name as source.mic.device)")
    return "\n".join(lines)
