"""Writers for `infer` results: JSON lines (the event schema), CSV, Raven selection tables, pooled embeddings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edge.events import Event

RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)", "Begin File", "Prompt", "Answer", "Score"]
CSV_COLUMNS = ["source", "prompt_id", "kind", "window_index", "start_s", "end_s", "start_utc", "answer", "score",
               "positive"]


def jsonl(events: Iterable[Event]) -> str:
    return "".join(e.to_json() + "\n" for e in events)


def csv_row(e: Event) -> list:
    return [e.source, e.prompt_id, e.kind, e.window.index, f"{e.window.offset_s:.3f}",
            f"{e.window.offset_s + e.window.duration_s:.3f}", e.window.to_dict(0)["start"], e.answer,
            "" if e.score is None else f"{e.score:.6f}", "" if e.positive is None else int(e.positive)]


def csv_rows(events: Iterable[Event], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(CSV_COLUMNS)
    for e in events:
        w.writerow(csv_row(e))
    return buf.getvalue()


def csv_table(events: Iterable[Event]) -> str:
    return csv_rows(events)


class RavenMerger:
    """Raven selections built as events arrive (each source's windows in order), holding only the open selection of
    each (source, prompt): per source and prompt, consecutive windows with the same answer merge into one selection
    (score = the highest of the merged windows). For yes_no prompts only positive windows are selections: a selection
    table lists detections; the other kinds list every answer."""

    def __init__(self):
        self.rows: list[dict] = []
        self._open: dict[tuple, dict] = {}

    def add(self, e: Event) -> None:
        key = (e.source, e.prompt_id)
        if e.kind == "yes_no" and not e.positive:
            self._open.pop(key, None)
            return
        begin, end = e.window.offset_s, e.window.offset_s + e.window.duration_s
        cur = self._open.get(key)
        if cur and cur["answer"] == str(e.answer) and begin <= cur["end"] + 1e-6 and cur["index"] == e.window.index - 1:
            cur["end"] = max(cur["end"], end)
            cur["index"] = e.window.index
            if e.score is not None:
                cur["score"] = max(cur["score"] or 0.0, e.score)
            return
        cur = {"source": e.source, "prompt": e.prompt_id, "answer": str(e.answer), "begin": begin, "end": end,
               "score": e.score, "index": e.window.index}
        self._open[key] = cur
        self.rows.append(cur)

    def take(self) -> list[dict]:
        """The selections so far, in table order (source, begin, prompt); the merger starts afresh."""
        rows = sorted(self.rows, key=lambda r: (r["source"], r["begin"], r["prompt"]))
        self.rows, self._open = [], {}
        return rows


def raven_selections(events: Iterable[Event]) -> list[dict]:
    merger = RavenMerger()
    for e in sorted(events, key=lambda e: (e.source, e.prompt_id, e.window.index)):
        merger.add(e)
    return merger.take()


def raven_lines(rows: list[dict], first: int = 1, low_hz: float = 0.0, high_hz: float = 8000.0) -> str:
    out = []
    for i, r in enumerate(rows, start=first):
        answer = r["answer"].replace("\t", " ").replace("\n", " ")
        score = "" if r["score"] is None else f"{r['score']:.4f}"
        out.append("\t".join([str(i), "Spectrogram 1", "1", f"{r['begin']:.3f}", f"{r['end']:.3f}", f"{low_hz:.1f}",
                              f"{high_hz:.1f}", Path(r["source"]).name, r["prompt"], answer, score]) + "\n")
    return "".join(out)


RAVEN_HEADER = "\t".join(RAVEN_COLUMNS) + "\n"


def raven_table(events: Iterable[Event], low_hz: float = 0.0, high_hz: float = 8000.0) -> str:
    return RAVEN_HEADER + raven_lines(raven_selections(events), 1, low_hz, high_hz)


def read_raven_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def save_embeddings(path: Path, records: list[tuple[str, float, float, np.ndarray]]) -> None:
    """One pooled (mean over the window's audio embeddings) vector per window, with its source and time span, as
    .npz: `embeddings` (n, width) float32, `start_s`, `end_s` (n,), `source` (n,) strings."""
    path = Path(path)
    if records:
        emb = np.stack([r[3] for r in records]).astype(np.float32)
    else:
        emb = np.zeros((0, 0), np.float32)
    np.savez(path, embeddings=emb, start_s=np.array([r[1] for r in records], np.float64),
             end_s=np.array([r[2] for r in records], np.float64), source=np.array([r[0] for r in records], dtype=str))


def events_from_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
