"""The prompts a device asks of every window: id, kind, text, labels, threshold, every-n-windows, priority and
active hours.

Loaded from YAML (a file, or an inline list in the daemon config) and validated into frozen dataclasses; a problem is
a ConfigError naming the file and the key path (`prompts.yaml: [2].kind: ...`).

Kinds: `yes_no` (a score from one forward pass), `label` (answer constrained to `labels`), `open` and `caption`
(text of at most `max_tokens`, decoded by beam search with `num_beams` beams, 2 by default as upstream NatureLM-audio
decodes, or greedily with `num_beams: 1`), `count` (a number).

`priority` decides what the daemon stops asking first when the device is too hot or falls behind real time
(edge/scheduler.py): lower goes first. Left out, it follows the kind: detections (yes_no, label) are what a recorder
is deployed for and are cheap (one forward pass, or a few tokens), captions and open answers cost a generation of up
to `max_tokens` tokens and are the first to go, counts sit between.

`active_hours` limits a prompt to a daily schedule in the device's local time ("20:00-06:00": night-only owls); a
window is matched by the local time of its first sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from edge.errors import ConfigError, show_value

KINDS = ("yes_no", "label", "open", "caption", "count")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELDS = {"id", "kind", "text", "labels", "threshold", "every_n_windows", "max_tokens", "priority", "active_hours",
           "num_beams"}
#: Kinds whose answer is decoded text and may take num_beams (edge/llm.py); 1 is greedy.
BEAM_KINDS = ("open", "caption")
MAX_BEAMS = 8  # edge.llm.MAX_BEAMS (the sequences each window has in the llama.cpp context)
#: Priority of a prompt that gives none: detections are kept longest, generated text is shed first.
DEFAULT_PRIORITY = {"yes_no": 20, "label": 20, "count": 10, "open": 0, "caption": 0}
_HHMM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class PromptSpec:
    id: str
    kind: str
    text: str
    labels: tuple = ()
    threshold: float = 0.5  # yes_no: positive when P(Yes) >= threshold; label: when its score >= threshold
    every_n_windows: int = 1  # ask on windows whose index is a multiple of this (expensive prompts less often)
    max_tokens: int = 48  # open/caption: bound on generated tokens
    priority: int | None = None  # higher is kept longer when the device must shed load; None: DEFAULT_PRIORITY
    active_hours: tuple = ()  # ((start_minute, end_minute), ...) of the local day; empty: all day
    num_beams: int | None = None  # open/caption: beam width, 1 = greedy; None: the engine's default (2, as upstream)

    def __post_init__(self):
        if self.priority is None:
            object.__setattr__(self, "priority", DEFAULT_PRIORITY.get(self.kind, 0))

    def due(self, window_index: int) -> bool:
        return window_index % self.every_n_windows == 0

    def active_at(self, when: datetime) -> bool:
        """Whether `when` (an aware datetime; naive is taken as local) falls in the prompt's active hours, read in the
        device's local time zone."""
        if not self.active_hours:
            return True
        local = when.astimezone() if when.tzinfo is not None else when
        return minute_in_ranges(local.hour * 60 + local.minute, self.active_hours)


def minute_in_ranges(minute: int, ranges) -> bool:
    """Minute of the day in any [start, end) range; a range whose end is before its start wraps past midnight."""
    for start, end in ranges:
        if (start <= minute < end) if start < end else (minute >= start or minute < end):
            return True
    return False


def _minute(text: str, allow_24: bool):
    m = _HHMM.match(text)
    if not m:
        return None
    h, mi = int(m.group(1)), int(m.group(2))
    if mi > 59 or h > 24 or (h == 24 and (mi or not allow_24)):
        return None
    return h * 60 + mi


def parse_active_hours(value, origin: str, where: str) -> tuple:
    """"HH:MM-HH:MM" or a list of them -> ((start_minute, end_minute), ...). End 24:00 is the end of the day; an end
    before the start wraps past midnight ("20:00-06:00")."""
    items = [value] if isinstance(value, str) else value
    hint = "must be 'HH:MM-HH:MM' (e.g. '20:00-06:00'; local time) or a list of them"
    if not isinstance(items, list) or not items:
        raise _err(origin, where, f"{hint}, got {show_value(value)}")
    ranges = []
    for i, item in enumerate(items):
        at = where if isinstance(value, str) else f"{where}[{i}]"
        parts = item.split("-") if isinstance(item, str) else []
        if len(parts) != 2:
            raise _err(origin, at, f"{hint}, got {show_value(item)}")
        start, end = _minute(parts[0], allow_24=False), _minute(parts[1], allow_24=True)
        if start is None or end is None:
            raise _err(origin, at, f"{hint}; hours 00-23 (24:00 only as an end), minutes 00-59, got {show_value(item)}")
        if start == end % 1440:
            raise _err(origin, at, f"{item.strip()!r} is empty or the whole day; leave active_hours out to ask "
                                   "all day")
        ranges.append((start, end))
    return tuple(ranges)


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def key_text(key) -> str:
    """A mapping key as it goes into a key path: plain words as they are, anything else (a newline, a space, a
    number, null) quoted, so that the message stays one line and says exactly which key."""
    return key if isinstance(key, str) and _PLAIN_KEY.match(key) else show_value(key)


def _err(origin: str, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{origin}: {path}: {msg}")


def _parse_one(item, i: int, origin: str, base: str) -> PromptSpec:
    where = f"{base}[{i}]"
    if not isinstance(item, dict):
        raise _err(origin, where, f"must be a mapping with id, kind and text, got {type(item).__name__}")
    # YAML keys need not be strings (`1: x`, `null: y`): sort by their text, never by mixed types.
    unknown = sorted((k for k in item if k not in _FIELDS), key=str)
    if unknown:
        raise _err(origin, f"{where}.{key_text(unknown[0])}", f"unknown key (known: {', '.join(sorted(_FIELDS))})")
    for key in ("id", "kind", "text"):
        if key not in item:
            raise _err(origin, f"{where}.{key}", "missing")
        if not isinstance(item[key], str) or not item[key].strip():
            raise _err(origin, f"{where}.{key}", f"must be a non-empty string, got {show_value(item[key])}")
    if not _ID_RE.match(item["id"]):
        raise _err(origin, f"{where}.id", f"{item['id']!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if item["kind"] not in KINDS:
        raise _err(origin, f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {show_value(item['kind'])}")
    labels = item.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise _err(origin, f"{where}.labels", "must be a list of non-empty strings")
    if item["kind"] == "label" and len(labels) < 2:
        raise _err(origin, f"{where}.labels", "a label prompt needs at least two labels")
    if item["kind"] != "label" and labels:
        raise _err(origin, f"{where}.labels", f"only label prompts take labels (this one is {item['kind']})")
    if len(set(labels)) != len(labels):
        raise _err(origin, f"{where}.labels", "labels must be unique")
    threshold = item.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise _err(origin, f"{where}.threshold", f"must be a number in [0, 1], got {show_value(threshold)}")
    ints = {}
    for key, default, lo, hi in (("every_n_windows", 1, 1, 100000), ("max_tokens", 48, 1, 1024),
                                 ("priority", None, -1000, 1000)):
        v = item.get(key, default)
        if v is None and default is None:
            ints[key] = None  # the kind's default (DEFAULT_PRIORITY)
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _err(origin, f"{where}.{key}", f"must be an integer in {lo}..{hi}, got {show_value(v)}")
        ints[key] = v
    beams = item.get("num_beams")
    if beams is not None:
        if isinstance(beams, bool) or not isinstance(beams, int) or not 1 <= beams <= MAX_BEAMS:
            raise _err(origin, f"{where}.num_beams", f"must be an integer in 1..{MAX_BEAMS} (1: greedy), got "
                                                     f"{show_value(beams)}")
        if item["kind"] not in BEAM_KINDS:
            raise _err(origin, f"{where}.num_beams", f"only open and caption prompts are decoded with beams (this one "
                                                     f"is {item['kind']})")
    hours = item.get("active_hours")
    active = () if hours is None else parse_active_hours(hours, origin, f"{where}.active_hours")
    return PromptSpec(id=item["id"], kind=item["kind"], text=item["text"].strip(), labels=tuple(labels),
                      threshold=float(threshold), active_hours=active, num_beams=beams, **ints)


def parse_prompts(items, origin: str, base: str = "") -> list[PromptSpec]:
    """Validate a list of prompt mappings. `origin` names the file in messages, `base` the key path to the list."""
    if not isinstance(items, list) or not items:
        raise _err(origin, base or "prompts", "must be a non-empty list of prompts")
    # Every bad prompt is reported (the first problem of each), one line each, not only the first bad prompt.
    prompts, errors = [], []
    for i, item in enumerate(items):
        try:
            prompts.append((i, _parse_one(item, i, origin, base)))
        except ConfigError as e:
            errors.append(str(e))
    seen = set()
    for i, p in prompts:
        if p.id in seen:
            errors.append(str(_err(origin, f"{base}[{i}].id", f"duplicate prompt id {p.id!r}")))
        seen.add(p.id)
    if errors:
        raise ConfigError("\n".join(errors))
    return [p for _, p in prompts]


def load_prompts(source, origin: str | None = None, base: str = "") -> list[PromptSpec]:
    """From a YAML file path (a list, or a mapping with a `prompts:` list) or an already-parsed list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        origin = origin or str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: prompts file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        if isinstance(data, dict) and "prompts" in data:
            if set(data) != {"prompts"}:
                extra = min((k for k in data if k != "prompts"), key=str)
                raise ConfigError(f"{path}: {key_text(extra)}: unknown key (a prompts file holds `prompts:` only)")
            data, base = data["prompts"], "prompts"
        return parse_prompts(data, origin, base)
    return parse_prompts(source, origin or "<prompts>", base)


def single_prompt(text: str, kind: str = "open") -> list[PromptSpec]:
    """`infer --prompt TEXT`: one prompt; a question that asks for Yes or No becomes a yes_no prompt."""
    if kind == "open" and re.search(r"\byes or no\b", text, re.IGNORECASE):
        kind = "yes_no"
    return parse_prompts([{"id": "prompt", "kind": kind, "text": text}], "--prompt")
