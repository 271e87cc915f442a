"""Detection lifecycles: the answers of a yes_no or label prompt, window by window, turned into detections that start,
are updated and end, each with a stable id.

Why: a dashboard entity fed straight from the answers never turns off (a window that was gated, out of schedule,
shed or withheld gives no answer at all), and with overlapping windows (hop < window) one call heard in two windows
would count twice. Here:

- a detection *starts* with the first positive answer of a prompt (for a label prompt: of one label);
- every positive answer whose window starts before the detection's last positive window ended plus the quiet time
  *updates* it (an overlapping window that hears the same call is the same detection);
- it *ends* once the audio clock has moved `quiet_s` past the end of its last positive window. The clock is the end
  of the latest window handed to `advance`, and every window is handed over, whatever became of it (processed,
  gated, idle, shed, failed, withheld), so a detection always ends. When no window comes at all for `idle_s` of
  wall time (the source stalled), `expire_idle` ends the open detections instead; a slow model that still delivers
  windows never triggers it, so it cannot split a detection that the audio clock keeps together.

Times: the source's offset (seconds since it started; monotonic, so a clock step cannot end or extend a detection)
drives the lifecycle; the UTC times from the capture clock are what the messages show.

Per prompt and label, the tracker also knows whether a detection is the first of the local day, and whether it falls
within the prompt's cooldown after the last one that was notified (edge/live.py uses both for notifications).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from edge.events import Event, WindowInfo, utc_iso

#: Prompt kinds that have detections (a positive answer); the others (open, caption, count) have none.
DETECTION_KINDS = ("yes_no", "label")


@dataclass
class Detection:
    prompt_id: str
    label: str | None
    id: str
    started_utc: datetime
    last_utc: datetime  # end of the last positive window, capture clock
    last_end_s: float  # the same on the source's offset clock
    windows: int = 1
    max_score: float | None = None
    last_score: float | None = None
    first_of_day: bool = False
    ended_utc: datetime | None = None

    def message(self, phase: str) -> dict:
        """The lifecycle message of this detection, as published on the prompt's state topic."""
        return {"state": "OFF" if phase == "end" else "ON", "phase": phase, "prompt_id": self.prompt_id,
                "label": self.label, "detection_id": self.id, "started": utc_iso(self.started_utc),
                "last_heard": utc_iso(self.last_utc),
                "ended": utc_iso(self.ended_utc) if self.ended_utc is not None else None,
                "windows": self.windows, "score": _round(self.max_score), "last_score": _round(self.last_score),
                "first_of_day": self.first_of_day}


def _round(v):
    return None if v is None else round(float(v), 4)


@dataclass(frozen=True)
class Change:
    """One step of a lifecycle: phase `start`, `update` or `end` of `detection` (a snapshot of its message)."""

    phase: str
    detection: Detection
    message: dict


class DetectionTracker:
    def __init__(self, quiet_s: float, idle_s: float | None = None):
        """quiet_s: audio seconds without a positive answer after which a detection ends. idle_s: wall seconds
        without any window after which open detections end anyway (None: quiet_s plus a margin)."""
        self.quiet_s = float(quiet_s)
        self.idle_s = float(idle_s) if idle_s is not None else self.quiet_s + 60.0
        self.open: dict[tuple[str, str | None], Detection] = {}
        self._last_day: dict[tuple[str, str | None], str] = {}  # local date of the last detection start
        self.clock_s = 0.0  # end of the latest window seen, source offset
        self.wall_last = time.monotonic()  # when the latest window was seen (or a detection started)
        self.started = 0
        self.ended = 0

    def observe(self, window: WindowInfo, events: list[Event]) -> list[Change]:
        """The answers of one window (before they are stored): starts and updates, and each positive event of a
        detection prompt gets its `detection` ({"id", "phase"}) set."""
        changes = []
        end_s = window.offset_s + window.duration_s
        end_utc = window.start_utc + timedelta(seconds=max(window.duration_s, 0.0))
        for e in events:
            if e.kind not in DETECTION_KINDS or not e.positive:
                continue
            label = e.answer if e.kind == "label" and isinstance(e.answer, str) else None
            key = (e.prompt_id, label)
            d = self.open.get(key)
            if d is not None and window.offset_s <= d.last_end_s + self.quiet_s:
                d.windows += 1
                d.last_end_s = max(d.last_end_s, end_s)
                d.last_utc = max(d.last_utc, end_utc)
                d.last_score = e.score
                if e.score is not None:
                    d.max_score = e.score if d.max_score is None else max(d.max_score, e.score)
                phase = "update"
            else:
                if d is not None:  # a gap longer than the quiet time inside one window's answers: end the old one
                    changes.append(self._end(key, d))
                day = window.start_utc.astimezone().date().isoformat()  # the device's local day
                first = self._last_day.get(key) != day
                self._last_day[key] = day
                d = Detection(prompt_id=e.prompt_id, label=label, id=uuid.uuid4().hex, started_utc=window.start_utc,
                              last_utc=end_utc, last_end_s=end_s, max_score=e.score, last_score=e.score,
                              first_of_day=first)
                self.open[key] = d
                self.wall_last = time.monotonic()
                self.started += 1
                phase = "start"
            e.detection = {"id": d.id, "phase": phase}
            changes.append(Change(phase, d, d.message(phase)))
        return changes

    def advance(self, window: WindowInfo) -> list[Change]:
        """Time passes: a window ended (whatever became of it). Ends the detections quiet for `quiet_s`."""
        self.clock_s = max(self.clock_s, window.offset_s + window.duration_s)
        self.wall_last = time.monotonic()
        done = [(k, d) for k, d in self.open.items() if self.clock_s - d.last_end_s >= self.quiet_s]
        return [self._end(k, d) for k, d in done]

    def expire_idle(self, now: float | None = None) -> list[Change]:
        """Wall-clock fallback for when no window comes at all for `idle_s`: every open detection ends."""
        now = time.monotonic() if now is None else now
        if not self.open or now - self.wall_last < self.idle_s:
            return []
        return self.end_all()

    def end_all(self) -> list[Change]:
        """Shutdown: every open detection ends now (a stopped recorder hears nothing)."""
        return [self._end(k, d) for k, d in list(self.open.items())]

    def _end(self, key, d: Detection) -> Change:
        del self.open[key]
        d.ended_utc = d.last_utc
        self.ended += 1
        return Change("end", d, d.message("end"))

    def active(self, prompt_id: str) -> list[Detection]:
        return [d for (p, _), d in self.open.items() if p == prompt_id]


__all__ = ["DETECTION_KINDS", "Change", "Detection", "DetectionTracker"]
