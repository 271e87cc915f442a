"""The prompts a device asks of every window: id, kind, text, labels, threshold, every-n-windows.

Loaded from YAML (a file, or an inline list in the daemon config) and validated into frozen dataclasses; a problem is
a ConfigError naming the file and the key path (`prompts.yaml: [2].kind: ...`).

Kinds: `yes_no` (a score from one forward pass), `label` (answer constrained to `labels`), `open` and `caption`
(greedy text, at most `max_tokens`), `count` (a number).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from edge.errors import ConfigError

KINDS = ("yes_no", "label", "open", "caption", "count")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELDS = {"id", "kind", "text", "labels", "threshold", "every_n_windows", "max_tokens", "priority"}


@dataclass(frozen=True)
class PromptSpec:
    id: str
    kind: str
    text: str
    labels: tuple = ()
    threshold: float = 0.5  # yes_no: positive when P(Yes) >= threshold; label: when its score >= threshold
    every_n_windows: int = 1  # ask on windows whose index is a multiple of this (expensive prompts less often)
    max_tokens: int = 48  # open/caption: bound on generated tokens
    priority: int = 0  # higher is kept longer when the device must shed load

    def due(self, window_index: int) -> bool:
        return window_index % self.every_n_windows == 0


def _err(origin: str, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{origin}: {path}: {msg}")


def _parse_one(item, i: int, origin: str, base: str) -> PromptSpec:
    where = f"{base}[{i}]"
    if not isinstance(item, dict):
        raise _err(origin, where, f"must be a mapping with id, kind and text, got {type(item).__name__}")
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise _err(origin, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_FIELDS))})")
    for key in ("id", "kind", "text"):
        if key not in item:
            raise _err(origin, f"{where}.{key}", "missing")
        if not isinstance(item[key], str) or not item[key].strip():
            raise _err(origin, f"{where}.{key}", f"must be a non-empty string, got {item[key]!r}")
    if not _ID_RE.match(item["id"]):
        raise _err(origin, f"{where}.id", f"{item['id']!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if item["kind"] not in KINDS:
        raise _err(origin, f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {item['kind']!r}")
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
        raise _err(origin, f"{where}.threshold", f"must be a number in [0, 1], got {threshold!r}")
    ints = {}
    for key, default, lo, hi in (("every_n_windows", 1, 1, 100000), ("max_tokens", 48, 1, 1024),
                                 ("priority", 0, -1000, 1000)):
        v = item.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _err(origin, f"{where}.{key}", f"must be an integer in {lo}..{hi}, got {v!r}")
        ints[key] = v
    return PromptSpec(id=item["id"], kind=item["kind"], text=item["text"].strip(), labels=tuple(labels),
                      threshold=float(threshold), **ints)


def parse_prompts(items, origin: str, base: str = "") -> list[PromptSpec]:
    """Validate a list of prompt mappings. `origin` names the file in messages, `base` the key path to the list."""
    if not isinstance(items, list) or not items:
        raise _err(origin, base or "prompts", "must be a non-empty list of prompts")
    prompts = [_parse_one(item, i, origin, base) for i, item in enumerate(items)]
    seen = set()
    for i, p in enumerate(prompts):
        if p.id in seen:
            raise _err(origin, f"{base}[{i}].id", f"duplicate prompt id {p.id!r}")
        seen.add(p.id)
    return prompts


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
                extra = min(set(data) - {"prompts"})
                raise ConfigError(f"{path}: {extra}: unknown key (a prompts file holds `prompts:` only)")
            data, base = data["prompts"], "prompts"
        return parse_prompts(data, origin, base)
    return parse_prompts(source, origin or "<prompts>", base)


def single_prompt(text: str, kind: str = "open") -> list[PromptSpec]:
    """`infer --prompt TEXT`: one prompt; a question that asks for Yes or No becomes a yes_no prompt."""
    if kind == "open" and re.search(r"\byes or no\b", text, re.IGNORECASE):
        kind = "yes_no"
    return parse_prompts([{"id": "prompt", "kind": kind, "text": text}], "--prompt")
