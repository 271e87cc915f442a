"""Events: one answer of one prompt for one window. Plain data, serialised to the versioned JSON Schema in
edge/schemas/event.schema.json (shipped in the package; every event produced in tests is validated against it)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

#: 2: optional `detection`, `location`, `clip_url`, and the delivery fields the drainer adds at publish time
#: (`published`, `age_s`, `replayed`, `late`).
SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).parent / "schemas" / "event.schema.json"


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def utc_iso(t: datetime) -> str:
    """ISO 8601 with milliseconds and a Z suffix."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class WindowInfo:
    index: int
    offset_s: float
    duration_s: float
    start_utc: datetime  # of the first sample, from the source's capture clock

    def to_dict(self, window_seconds: float) -> dict:
        return {
            "start": utc_iso(self.start_utc),
            "end": utc_iso(self.start_utc + timedelta(seconds=max(self.duration_s, 0.0))),
            "offset_s": round(self.offset_s, 6),
            "duration_s": round(self.duration_s, 6),
            "index": self.index,
        }


@dataclass
class Event:
    device_id: str
    source: str
    window: WindowInfo
    prompt_id: str
    kind: str
    answer: object
    score: float | None
    model: dict
    timing_ms: dict
    question: str | None = None
    positive: bool | None = None
    clip: str | None = None
    clip_url: str | None = None  # where a dashboard can fetch the clip (the daemon's clip server), when served
    detection: dict | None = None  # {"id", "phase"} of the detection this positive answer belongs to (edge/detections.py)
    location: dict | None = None  # {"latitude", "longitude"} of the site, when the config gives one
    decoding: dict | None = None  # open/caption/count: {"method": "beam" | "greedy", "num_beams": n}
    seq: int = 0
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict:
        d = {
            "schema_version": SCHEMA_VERSION,
            "event_id": self.event_id,
            "seq": self.seq,
            "device_id": self.device_id,
            "source": self.source,
            "window": self.window.to_dict(self.window.duration_s),
            "prompt_id": self.prompt_id,
            "kind": self.kind,
            "answer": self.answer,
            "score": None if self.score is None else float(self.score),
            "model": dict(self.model),
            "timing_ms": {k: round(float(v), 3) for k, v in self.timing_ms.items()},
        }
        if self.question is not None:
            d["question"] = self.question
        if self.positive is not None:
            d["positive"] = bool(self.positive)
        if self.clip is not None:
            d["clip"] = self.clip
        if self.clip_url is not None:
            d["clip_url"] = self.clip_url
        if self.detection is not None:
            d["detection"] = dict(self.detection)
        if self.location is not None:
            d["location"] = dict(self.location)
        if self.decoding is not None:
            d["decoding"] = dict(self.decoding)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)


__all__ = ["SCHEMA_VERSION", "Event", "WindowInfo", "load_schema", "utc_iso"]
