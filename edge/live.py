"""What dashboards see live, fed by the daemon after each window's events are made: detection lifecycles
(edge/detections.py) on per-prompt retained state topics, the site's location on every event, and notifications of
detection starts in a BirdNET-Go-compatible payload, with a per-prompt cooldown and first-of-the-day filter.

The full event stream (outbox -> events topic) is untouched by all this: it still carries every answer, now with the
`detection` id of positive answers, for the consumers that want every answer.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from edge.clipserver import clip_url
from edge.config import Config
from edge.detections import DETECTION_KINDS, Change, DetectionTracker
from edge.events import Event, WindowInfo

logger = logging.getLogger(__name__)


def split_label(label: str) -> tuple[str, str]:
    """(common name, scientific name) of a label prompt's answer. BirdNET's own labels are
    "Scientific name_Common name"; "Common name (Scientific name)" is read too; any other label is both."""
    if "_" in label:
        sci, common = label.split("_", 1)
        return common.strip(), sci.strip()
    m = re.match(r"^\s*(.+?)\s*\(\s*([^()]+?)\s*\)\s*$", label)
    if m:
        return m.group(1), m.group(2)
    return label.strip(), label.strip()


def birdnet_payload(change: Change, cfg: Config, source: str, processing_ms: float, clip_name: str = "") -> dict:
    """A detection start as BirdNET-Go publishes a detection on its MQTT topic, so that Home Assistant cards made
    for BirdNET-Go read it unchanged.

    Field by field from BirdNET-Go's code: the payload is `NoteWithBirdImage` (tphakala/birdnet-go,
    internal/analysis/processor/actions_integrations.go, MqttAction.Execute): the embedded `datastore.Note`
    (internal/datastore/model.go; Go's encoding/json writes its untagged fields under their Go names, and a
    time.Duration as integer nanoseconds, a time.Time as RFC 3339) with `ID` and `Source` suppressed, plus
    `detectionId`, `sourceId`, `sourceName` and `BirdImage`. `Date`/`Time` come from NoteFromResult
    (internal/datastore/interfaces.go): the detection's local date "2006-01-02" and time "15:04:05". The frozen field
    names are listed in internal/analysis/processor/mqtt_api_contract_test.go.

    What has no equivalent here: `detectionId` (a database row id there) is 0, `BirdImage` holds empty strings (no
    image provider on a field recorder), `Results` (BirdNET's other candidate species) is null, `SpeciesCode` is
    empty, `Sensitivity` is 1.0. The NatureLM detection id is added as `naturelmDetectionId` (the contract test
    allows added fields).
    """
    d = change.detection
    common, sci = split_label(d.label or d.prompt_id)
    local = d.started_utc.astimezone()
    spec = next((p for p in cfg.prompts if p.id == d.prompt_id), None)
    return {
        "SourceNode": cfg.device_id,
        "AudioSourceID": source,
        "Date": local.strftime("%Y-%m-%d"),
        "Time": local.strftime("%H:%M:%S"),
        "BeginTime": _rfc3339(d.started_utc),
        "EndTime": _rfc3339(d.last_utc),
        "SpeciesCode": "",
        "ScientificName": sci,
        "CommonName": common,
        "Confidence": round(float(d.last_score or 0.0), 4),
        "Latitude": cfg.site.latitude if cfg.site.latitude is not None else 0.0,
        "Longitude": cfg.site.longitude if cfg.site.longitude is not None else 0.0,
        "Threshold": float(spec.threshold) if spec is not None else 0.0,
        "Sensitivity": 1.0,
        "ClipName": clip_name,
        "ProcessingTime": round(processing_ms * 1e6),  # a Go time.Duration: nanoseconds
        "Results": None,
        "Review": None,
        "Comments": None,
        "Lock": None,
        "Verified": "",
        "Locked": False,
        "detectionId": 0,
        "sourceId": source,
        "sourceName": source,
        "BirdImage": {"URL": "", "ScientificName": sci, "LicenseName": "", "LicenseURL": "", "AuthorName": "",
                      "AuthorURL": "", "CachedAt": "0001-01-01T00:00:00Z", "SourceProvider": ""},
        "naturelmDetectionId": d.id,
    }


def _rfc3339(t: datetime) -> str:
    return t.astimezone().isoformat()


class LiveOutputs:
    """The daemon's live side. `observe` runs on the inference thread before the window's events are stored;
    `advance` after every window, whatever became of it; `tick` on the main loop (wall-clock expiry)."""

    def __init__(self, cfg: Config, link):
        self.cfg = cfg
        self.link = link
        self.tracker = DetectionTracker(cfg.detections.quiet_s,
                                        idle_s=cfg.detections.quiet_s + cfg.windowing.window_s
                                        + cfg.windowing.max_pending * cfg.windowing.hop_s + 30.0)
        self._lock = threading.Lock()
        self._last_notified: dict[tuple, float] = {}  # (prompt, label) -> window offset_s of the last notification
        self.notified = 0
        self.suppressed = {"cooldown": 0, "not_first_of_day": 0}
        self._states_sent: set = set()  # prompts whose state topic has a retained state

    @property
    def location(self) -> dict | None:
        s = self.cfg.site
        return None if s.latitude is None else {"latitude": s.latitude, "longitude": s.longitude}

    def set_prompts(self, prompts, drop_removed: bool = True) -> None:
        """A reload or a remote change: thresholds and kinds as now configured; a new detection prompt starts OFF.
        A removed one has its retained state cleared when its entity goes too (a reload); a prompt disabled remotely
        keeps its entity, which goes OFF when its open detection ends by the quiet time."""
        old = {p.id for p in self.cfg.prompts if p.kind in DETECTION_KINDS}
        new = [p for p in prompts if p.kind in DETECTION_KINDS]
        self.cfg = replace(self.cfg, prompts=tuple(prompts))
        self.reset_states([p for p in new if p.id not in old and p.id not in self._states_sent])
        if drop_removed:
            for pid in old - {p.id for p in new}:
                self.link.clear_state(pid)
                self._states_sent.discard(pid)

    def reset_states(self, prompts) -> None:
        """At start: every detection prompt's retained state says OFF (a state left ON by a crash is stale)."""
        for p in prompts:
            if p.kind in DETECTION_KINDS:
                self._states_sent.add(p.id)
                self.link.publish_state(p.id, {"state": "OFF", "phase": "none", "prompt_id": p.id, "label": None,
                                               "detection_id": None, "started": None, "last_heard": None,
                                               "ended": None, "windows": 0, "score": None, "last_score": None,
                                               "first_of_day": False})

    def observe(self, window: WindowInfo, events: list[Event], source: str = "", processing_ms: float = 0.0) -> None:
        loc = self.location
        clip = next((e.clip for e in events if e.clip), None)
        served = self.cfg.clip_server.enabled
        for e in events:
            if loc is not None:
                e.location = dict(loc)
            if served and e.clip:
                e.clip_url = clip_url(self.cfg.clip_server, e.clip)
        with self._lock:
            changes = self.tracker.observe(window, events)
            self._emit(changes, source=source, processing_ms=processing_ms, clip=clip or "")

    def advance(self, window: WindowInfo) -> None:
        with self._lock:
            self._emit(self.tracker.advance(window))

    def tick(self) -> None:
        with self._lock:
            changes = self.tracker.expire_idle()
            if changes:
                logger.info("no window for %.0f s: ended %d detection(s) by the wall clock", self.tracker.idle_s,
                            len(changes))
            self._emit(changes)

    def end_all(self) -> None:
        with self._lock:
            self._emit(self.tracker.end_all())

    def _emit(self, changes: list[Change], source: str = "", processing_ms: float = 0.0, clip: str = "") -> None:
        for ch in changes:
            msg = dict(ch.message)
            # One prompt can have several open detections (label prompts, one per label): the entity stays ON
            # while any is.
            if self.tracker.active(ch.detection.prompt_id):
                msg["state"] = "ON"
            if self.location is not None:
                msg["location"] = self.location
            self.link.publish_state(ch.detection.prompt_id, msg)
            if ch.phase == "start":
                logger.info("detection %s started: %s%s (score %s)", ch.detection.id[:8], ch.detection.prompt_id,
                            f" {ch.detection.label}" if ch.detection.label else "", msg["score"])
                self._notify(ch, source, processing_ms, clip)
            elif ch.phase == "end":
                logger.info("detection %s ended: %s%s after %d window(s)", ch.detection.id[:8],
                            ch.detection.prompt_id, f" {ch.detection.label}" if ch.detection.label else "",
                            ch.detection.windows)

    def _notify(self, ch: Change, source: str, processing_ms: float, clip: str) -> None:
        d = ch.detection
        rule = self.cfg.detections.notify_for(d.prompt_id)
        key = (d.prompt_id, d.label)
        if rule.first_of_day and not d.first_of_day:
            self.suppressed["not_first_of_day"] += 1
            return
        # The cooldown runs on the audio clock, like the lifecycle: replaying a file does not defeat it.
        now = d.last_end_s
        last = self._last_notified.get(key)
        if last is not None and rule.cooldown_s > 0 and now - last < rule.cooldown_s:
            self.suppressed["cooldown"] += 1
            return
        self._last_notified[key] = now
        self.notified += 1
        b = self.cfg.detections.birdnet
        spec = next((p for p in self.cfg.prompts if p.id == d.prompt_id), None)
        if b.enabled and spec is not None and spec.kind == "label" and (not b.prompts or d.prompt_id in b.prompts):
            payload = birdnet_payload(ch, self.cfg, source, processing_ms, clip_name=Path(clip).name if clip else "")
            if clip and self.cfg.clip_server.enabled:
                payload["clipUrl"] = clip_url(self.cfg.clip_server, clip)
            self.link.publish_live(b.topic or f"{self.link.base}/birdnet", payload, made=time.time())

    def health(self) -> dict:
        return {"open": len(self.tracker.open), "started": self.tracker.started, "ended": self.tracker.ended,
                "notified": self.notified, "suppressed": dict(self.suppressed)}


__all__ = ["LiveOutputs", "birdnet_payload", "split_label"]
