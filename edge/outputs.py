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


def csv_table(events: Iterable[Event]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for e in events:
        w.writerow([e.source, e.prompt_id, e.kind, e.window.index, f"{e.window.offset_s:.3f}",
                    f"{e.window.offset_s + e.window.duration_s:.3f}", e.window.to_dict(0)["start"], e.answer,
                    "" if e.score is None else f"{e.score:.6f}", "" if e.positive is None else int(e.positive)])
    return buf.getvalue()


def raven_selections(events: Iterable[Event]) -> list[dict]:
    """Selections for a Raven table: per source and prompt, consecutive windows with the same answer merge into one
    selection (score = the highest of the merged windows). For yes_no prompts only positive windows are selections:
    a selection table lists detections; the other kinds list every answer."""
    rows: list[dict] = []
    open_rows: dict[tuple, dict] = {}
    for e in sorted(events, key=lambda e: (e.source, e.prompt_id, e.window.index)):
        if e.kind == "yes_no" and not e.positive:
            open_rows.pop((e.source, e.prompt_id), None)
            continue
        key = (e.source, e.prompt_id)
        begin, end = e.window.offset_s, e.window.offset_s + e.window.duration_s
        cur = open_rows.get(key)
        if cur and cur["answer"] == str(e.answer) and begin <= cur["end"] + 1e-6 and cur["index"] == e.window.index - 1:
            cur["end"] = max(cur["end"], end)
            cur["index"] = e.window.index
            if e.score is not None:
                cur["score"] = max(cur["score"] or 0.0, e.score)
            continue
        cur = {"source": e.source, "prompt": e.prompt_id, "answer": str(e.answer), "begin": begin, "end": end,
               "score": e.score, "index": e.window.index}
        open_rows[key] = cur
        rows.append(cur)
    rows.sort(key=lambda r: (r["source"], r["begin"], r["prompt"]))
    return rows


def raven_table(events: Iterable[Event], low_hz: float = 0.0, high_hz: float = 8000.0) -> str:
    buf = io.StringIO()
    buf.write("\t".join(RAVEN_COLUMNS) + "\n")
    for i, r in enumerate(raven_selections(events), start=1):
        answer = r["answer"].replace("\t", " ").replace("\n", " ")
        score = "" if r["score"] is None else f"{r['score']:.4f}"
        buf.write("\t".join([str(i), "Spectrogram 1", "1", f"{r['begin']:.3f}", f"{r['end']:.3f}", f"{low_hz:.1f}",
                             f"{high_hz:.1f}", Path(r["source"]).name, r["prompt"], answer, score]) + "\n")
    return buf.getvalue()


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
