"""Thermal zones: the one reader of the device's temperatures, for health and for the prompt scheduler alike.

Some zones hang their readers: on an Orin Nano the cv0..cv2 zones block a `read()` of `temp` while those engines
are powered off, and a read in the inference thread stalled the analysis (and so the watchdog) for as long as the
driver pleased. Hence:

  - only the configured zones (`scheduling.thermal.zones`, globs) are read, never every zone on the board;
  - every read runs on a short-lived thread of its own and is waited for at most `timeout_s`; a zone that does not
    answer is reported (`unresponsive`), logged once, and not read again until its stuck read returns, so stuck
    threads never pile up (at most one per zone);
  - the daemon samples on a background thread (`ThermalReader`) every `interval_s`, and health and the scheduler
    read its cached values: two readers could disagree, and neither may wait for a sensor.

A zone is a file holding millidegrees Celsius (Linux's thermal_zone*/temp) or a directory holding such a `temp`;
its name is the `type` file beside it where there is one (on a Jetson: cpu-thermal, gpu-thermal, tj-thermal, ...).
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: How long one round of reads waits for the zones (all of them together).
READ_TIMEOUT_S = 1.0
#: The background reader never samples more often than this (interval_s 0 in a config means "as often as sensible").
MIN_INTERVAL_S = 0.05

_inflight: dict[str, threading.Thread] = {}  # zone path -> its read that has not returned yet
_inflight_lock = threading.Lock()


def zone_files(patterns) -> list[Path]:
    """The `temp` files the globs name, in order, without duplicates. Listing a directory never blocks on a sensor."""
    out, seen = [], set()
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)):
            path = Path(match)
            if path.is_dir():
                path = path / "temp"
            if str(path) not in seen:
                seen.add(str(path))
                out.append(path)
    return out


def _read_one(path: Path, results: dict) -> None:
    try:
        milli = int(path.read_text().strip())
        try:
            name = (path.parent / "type").read_text().strip() or str(path)
        except OSError:
            name = str(path)
        results[str(path)] = (name, round(milli / 1000.0, 1))
    except (OSError, ValueError):
        results[str(path)] = None  # a zone whose sensor sleeps, or a file that is not a temperature
    finally:
        with _inflight_lock:
            _inflight.pop(str(path), None)


def read_zones(patterns, timeout_s: float = READ_TIMEOUT_S) -> tuple[dict[str, float], list[str]]:
    """({zone name: degrees Celsius} of every readable zone, [paths of zones that did not answer in time])."""
    results: dict[str, tuple | None] = {}
    started, hung = [], []
    for path in zone_files(patterns):
        key = str(path)
        with _inflight_lock:
            if key in _inflight:  # its last read is still stuck: do not add a second thread
                hung.append(key)
                continue
            t = threading.Thread(target=_read_one, args=(path, results), name=f"thermal-read {key}", daemon=True)
            _inflight[key] = t
        t.start()
        started.append((path, t))
    deadline = time.monotonic() + timeout_s
    temps: dict[str, float] = {}
    for path, t in started:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            hung.append(str(path))
            continue
        got = results.get(str(path))
        if got is None:
            continue
        name, celsius = got
        if name in temps:
            name = f"{name}.{path.parent.name}"
        temps[name] = celsius
    return temps, hung


def read_zone_temperatures(patterns, timeout_s: float = READ_TIMEOUT_S) -> dict[str, float]:
    """{zone name: degrees Celsius} of every zone of `patterns` that answered within `timeout_s` (a one-off read, for
    `doctor`; the daemon uses ThermalReader)."""
    return read_zones(patterns, timeout_s)[0]


class ThermalReader:
    """Samples the configured zones on its own thread; `temperatures()` is the latest sample, never a wait."""

    def __init__(self, zones, interval_s: float, timeout_s: float = READ_TIMEOUT_S):
        self._lock = threading.Lock()
        self.zones, self.interval_s, self.timeout_s = tuple(zones), float(interval_s), float(timeout_s)
        self._temps: dict[str, float] = {}
        self._hung: list[str] = []
        self.read_at: float | None = None  # monotonic time of the last sample
        self.samples = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, zones, interval_s: float) -> None:
        """SIGHUP: new zones or interval from the next sample (taken at once)."""
        with self._lock:
            self.zones, self.interval_s = tuple(zones), float(interval_s)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thermal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a sensor must never end the sampling
                logger.exception("reading the thermal zones failed")
            self._wake.wait(max(MIN_INTERVAL_S, self.interval_s))
            self._wake.clear()

    def sample(self) -> dict[str, float]:
        with self._lock:
            zones = self.zones
        temps, hung = read_zones(zones, self.timeout_s)
        with self._lock:
            for path in sorted(set(hung) - set(self._hung)):
                logger.warning("thermal zone %s did not answer within %g s: skipped until its read returns", path,
                               self.timeout_s)
            for path in sorted(set(self._hung) - set(hung)):
                logger.info("thermal zone %s answers again", path)
            self._temps, self._hung = temps, hung
            self.read_at = time.monotonic()
            self.samples += 1
        return temps

    def temperatures(self) -> dict[str, float]:
        with self._lock:
            return dict(self._temps)

    def unresponsive(self) -> list[str]:
        with self._lock:
            return list(self._hung)


__all__ = ["ThermalReader", "read_zone_temperatures", "read_zones", "zone_files"]
