"""Health: the daemon's counters and the device's vital signs, published every `health.interval_s` on
`{prefix}/{device_id}/health` and summarised in one log line.

Everything here is cheap to read and needs no extra package: temperatures of the configured thermal zones, as the
daemon's one ThermalReader last sampled them (edge/thermal.py; on a Jetson the CPU, GPU and SoC zones; thermal
throttling is the usual cause of a real-time factor creeping up in summer), disk free from statvfs of the state
directory (the outbox and clips live there), resident memory from /proc/self/statm.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from edge.events import utc_iso

logger = logging.getLogger(__name__)

HEALTH_SCHEMA_VERSION = 1


def disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def rss_bytes() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class WindowCounters:
    """Written by the inference worker, read by health and the watchdog."""

    def __init__(self, hop_s: float):
        self.hop_s = hop_s
        self._lock = threading.Lock()
        self.processed = 0
        self.gated = 0
        self.idle = 0  # windows with no prompt to ask (all outside their active hours): no model work
        self.failed = 0
        self.events = 0
        self.busy_since: float | None = None  # monotonic start of the window being processed
        self.last_done = time.monotonic()  # last window completed successfully (or start-up)
        self.failed_in_a_row = 0
        self.last_streak = 0  # failures in a row before the last success
        self.last_error: dict | None = None  # {"window", "time", "error"} of the last failed window
        self._busy_s = 0.0  # inference seconds since the last report
        self._windows = 0  # windows since the last report

    def started(self) -> None:
        self.busy_since = time.monotonic()

    def finished(self, ok: bool, gated: bool = False, events: int = 0, idle: bool = False,
                 error: str | None = None, window: int | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            if self.busy_since is not None:
                self._busy_s += now - self.busy_since
                self._windows += 1
            self.busy_since = None
            if ok:
                self.processed += 1
                self.gated += int(gated)
                self.idle += int(idle)
                self.events += events
                self.last_done = now
                if self.failed_in_a_row:
                    self.last_streak, self.failed_in_a_row = self.failed_in_a_row, 0
            else:
                self.failed += 1
                self.failed_in_a_row += 1
                self.last_error = {"window": window, "time": utc_iso(datetime.now(timezone.utc)),
                                   "error": error or "unknown"}

    def take_rtf(self) -> float | None:
        """Inference seconds per second of audio since the last call (windows advance by hop_s). Above 1 the device
        cannot keep up and drops windows. None when no window was processed."""
        with self._lock:
            busy, n = self._busy_s, self._windows
            self._busy_s, self._windows = 0.0, 0
        return round(busy / (n * self.hop_s), 4) if n else None


def build_health(*, device_id: str, started_monotonic: float, counters: WindowCounters, rtf: float | None,
                 scheduler, ring, source, outbox, drainer, link, model: dict, state_dir: Path,
                 stores: dict, scheduling: dict | None = None, privacy: dict | None = None,
                 degraded: dict | None = None, events_held: int = 0, events_lost: int = 0,
                 temperatures: dict | None = None, thermal_unresponsive: list | None = None) -> dict:
    """The health report. `scheduling`: PromptScheduler.health() (shed level, skips per prompt id); `privacy`: counts of
    windows the privacy prompt flagged and of what was withheld because of them."""
    temps = dict(temperatures or {})
    src = source.health() if source is not None else {}
    return {
        "schema_version": HEALTH_SCHEMA_VERSION,
        "device_id": device_id,
        "time": utc_iso(datetime.now(timezone.utc)),
        "uptime_s": round(time.monotonic() - started_monotonic, 1),
        # edge/degraded.py: "online" or "degraded", and why ({key: {"reason", "since"}}).
        "status": (degraded or {}).get("status", "online"),
        "degraded": (degraded or {}).get("reasons", {}),
        "rtf": rtf,
        "windows_processed": counters.processed,
        "windows_gated": counters.gated,
        "windows_idle": counters.idle,
        "windows_failed": counters.failed,
        "windows_failed_in_a_row": counters.failed_in_a_row,
        "last_window_error": counters.last_error,
        "windows_dropped": scheduler.windows_dropped if scheduler is not None else 0,
        # Short tails at a gap or the end of a source, not analysed (edge/windowing.py MIN_TAIL_SECONDS).
        "tails_dropped": scheduler.tails_dropped if scheduler is not None else 0,
        "tail_s_dropped": (round(scheduler.tail_frames_dropped / scheduler.ring.sample_rate, 3)
                           if scheduler is not None else 0.0),
        "windows_pending": scheduler.pending() if scheduler is not None else 0,
        "events": counters.events,
        "overruns": ring.overruns if ring is not None else 0,
        "overrun_frames": ring.overrun_frames if ring is not None else 0,
        "source_gaps": src.get("gaps", 0),
        "source_gap_s": src.get("gap_s", 0.0),
        "source": src,
        "outbox_depth": outbox.depth,
        "outbox_bytes": outbox.bytes,
        "outbox_dropped": outbox.dropped,
        # Events of windows the outbox could not take (full disk, lock), kept in memory for the next write; and those
        # lost beyond that bound or at exit.
        "events_held": events_held,
        "events_lost": events_lost,
        "events_published": drainer.published,
        "mqtt": {"connected": link.connected.is_set(), "connects": link.connects,
                 "connect_failures": link.connect_failures, "last_error": link.last_error},
        "model": model,
        "temperatures_c": temps,
        "temperature_max_c": max(temps.values()) if temps else None,
        # Configured zones whose read did not return in time (edge/thermal.py); they are skipped until it does.
        "thermal_zones_unresponsive": list(thermal_unresponsive or []),
        "disk_free_bytes": disk_free(state_dir),
        "rss_bytes": rss_bytes(),
        **{f"{name}_saved": store.saved for name, store in stores.items()},
        **{f"{name}_failed": getattr(store, "failed", 0) for name, store in stores.items()},
        **({"scheduling": scheduling} if scheduling is not None else {}),
        **({"privacy": privacy} if privacy is not None else {}),
    }


def health_line(h: dict) -> str:
    """The health report as one line a person can read in `journalctl -u naturelm-edge`."""
    rtf = "n/a" if h["rtf"] is None else f"{h['rtf']:.2f}"
    temp = "" if h["temperature_max_c"] is None else f", max temp {h['temperature_max_c']:.0f} C"
    free = "" if h["disk_free_bytes"] is None else f", disk free {h['disk_free_bytes'] / 2**30:.1f} GiB"
    rss = "" if h["rss_bytes"] is None else f", rss {h['rss_bytes'] / 2**20:.0f} MiB"
    sched = h.get("scheduling") or {}
    shed = f", shedding {','.join(sched['shed'])} ({sched['reason']})" if sched.get("level") else ""
    priv = h.get("privacy") or {}
    private = f", privacy windows {priv['windows']}" if priv.get("windows") else ""
    return (f"health: up {h['uptime_s']:.0f} s, rtf {rtf}, windows {h['windows_processed']} "
            f"(gated {h['windows_gated']}, dropped {h['windows_dropped']}, failed {h['windows_failed']}), "
            f"overruns {h['overruns']}, source gaps {h['source_gaps']} ({h['source_gap_s']:.1f} s), "
            f"outbox {h['outbox_depth']} (dropped {h['outbox_dropped']}), published {h['events_published']}"
            f"{temp}{free}{rss}{shed}{private}")
