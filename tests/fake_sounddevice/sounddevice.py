"""A stand-in for the `sounddevice` module: one USB microphone that plays a tone in real time, and that a test can
make hang or vanish. Put this folder first on PYTHONPATH (a daemon subprocess) or in sys.modules (in process).

Control: the folder named by $FAKE_SD_CONTROL (read at each call), holding
  stall   while it exists, open streams stop calling back, and a stream that stalled stays dead (as a hung USB
          device does): only closing and reopening recovers;
  absent  while it exists, no device is listed and opening fails (unplugged).
Every stream opened is logged as a line in `opened` in that folder.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

__version__ = "0.0-fake"
NATIVE_RATE = 16000


class PortAudioError(Exception):
    pass


class CallbackFlags:
    def __bool__(self):
        return False


def _control() -> Path | None:
    d = os.environ.get("FAKE_SD_CONTROL")
    return Path(d) if d else None


def _flag(name: str) -> bool:
    c = _control()
    return c is not None and (c / name).exists()


class _Default:
    def __init__(self):
        self.device = [1, -1]


default = _Default()


def query_hostapis():
    return [{"name": "ALSA", "devices": [0, 1]}]


def query_devices():
    devices = [{"name": "HDA Intel PCH: ALC (hw:0,0)", "max_input_channels": 0, "max_output_channels": 2,
                "default_samplerate": 48000.0, "hostapi": 0}]
    if not _flag("absent"):
        devices.append({"name": "USB PnP Sound Device: Audio (hw:1,0)", "max_input_channels": 1,
                        "max_output_channels": 0, "default_samplerate": float(NATIVE_RATE), "hostapi": 0})
    return devices


def _terminate():
    pass


def _initialize():
    pass


class InputStream:
    def __init__(self, device, samplerate, channels, dtype, blocksize, callback):
        if _flag("absent") or device != 1:
            raise PortAudioError(f"Error opening InputStream: Invalid device [PaErrorCode -9996] ({device})")
        self.samplerate, self.channels, self.blocksize, self.callback = samplerate, channels, blocksize, callback
        self.active = False
        self._stop = threading.Event()
        self._dead = False
        c = _control()
        if c is not None:
            with open(c / "opened", "a") as f:
                f.write(f"{time.time()}\n")

    def start(self):
        self.active = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        n, t0, sent = self.blocksize, time.monotonic(), 0
        block = np.empty((n, self.channels), dtype=np.float32)
        while not self._stop.is_set():
            if _flag("stall"):
                self._dead = True
            if not self._dead:
                t = (sent + np.arange(n)) / self.samplerate
                block[:] = (0.3 * np.sin(2 * np.pi * 440 * t))[:, None]
                self.callback(block, n, None, CallbackFlags())
            sent += n
            delay = t0 + sent / self.samplerate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def abort(self, ignore_errors=True):
        self._stop.set()
        self.active = False

    def close(self, ignore_errors=True):
        self._stop.set()
        self.active = False
