"""Where `infer` streams its results while it runs: appended JSON lines and CSV, Raven tables, Parquet parts.

Everything is written as windows complete, so a crash after ten hours loses at most the windows in flight, and
nothing is held in memory beyond one window (and, for Raven, one file's merged selections; for Parquet, one part).

Appended streams can be cut back: a file that never finished has lines in them (a kill, a lost worker), and
`purge` removes exactly the lines of given sources from a byte offset on, keeping every other line in order. The
ledger (edge/ledger.py) records where each file's lines start.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import timezone
from pathlib import Path
from urllib.parse import quote

from edge.events import Event
from edge.outputs import CSV_COLUMNS, RAVEN_HEADER, RavenMerger, csv_row, raven_lines

logger = logging.getLogger(__name__)


def file_key(path: str) -> str:
    """A short stable name for a recording (its resolved path hashed): names its Parquet parts."""
    return hashlib.sha256(path.encode()).hexdigest()[:16]


class _Stream:
    """An append-only text file (or standard output), written one window at a time."""

    suffix = ""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        if self.path is None:
            self._f = sys.stdout
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (kept open for the run)
            if self._f.tell() == 0:
                self._header()

    def _header(self) -> None:
        pass

    def tell(self) -> int | None:
        return None if self.path is None else self._f.tell()

    def write_text(self, text: str) -> None:
        if text:
            self._f.write(text)
            self._f.flush()  # one write per window: a kill leaves at most the window being written

    def sync(self) -> None:
        """Flushed and on disk: called before the ledger says a file is done."""
        self._f.flush()
        if self.path is not None:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self.path is not None:
            self._f.close()

    def purge(self, start: int, sources: set[str]) -> int:
        """Drop the records of `sources` (and any incomplete last record) after byte `start`; returns how many were
        dropped. The kept tail is written back in its order."""
        assert self.path is not None
        self._f.flush()
        with open(self.path, "rb") as f:
            f.seek(start)
            tail = f.read().decode("utf-8", errors="replace")
        kept, dropped = self._filter(tail, sources)
        with open(self.path, "r+b") as f:
            f.truncate(start)
            f.seek(start)
            f.write(kept.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self._f.seek(0, os.SEEK_END)
        return dropped

    def _filter(self, tail: str, sources: set[str]) -> tuple[str, int]:
        raise NotImplementedError


class JsonlStream(_Stream):
    def write(self, events: Iterable[Event]) -> None:
        self.write_text("".join(e.to_json() + "\n" for e in events))

    def _filter(self, tail, sources):
        kept, dropped = [], 0
        for line in tail.splitlines(keepends=True):
            try:
                ok = line.endswith("\n") and json.loads(line)["source"] not in sources
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                kept.append(line)
            else:
                dropped += 1
        return "".join(kept), dropped


class CsvStream(_Stream):
    def _header(self) -> None:
        self.write_text(",".join(CSV_COLUMNS) + "\n")

    def write(self, events: Iterable[Event]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for e in events:
            w.writerow(csv_row(e))
        self.write_text(buf.getvalue())

    def _filter(self, tail, sources):
        # Records can span lines (a caption with a newline is quoted): parse, do not split. A record cut by a kill is
        # the last one and has no final newline.
        complete = tail if tail.endswith("\n") else tail[: tail.rfind("\n") + 1]
        dropped = int(complete != tail)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in csv.reader(io.StringIO(complete, newline="")):
            if len(row) != len(CSV_COLUMNS) or row[0] in sources:
                dropped += 1
                continue
            w.writerow(row)
        return buf.getvalue(), dropped


class RavenCombined:
    """One Raven table for every file of the run (`--format raven --out FILE`): each file's selections are added
    when it finishes, numbered on from the previous file's."""

    def __init__(self, path: Path | None):
        self.stream = _Stream(path)
        self.stream.write_text(RAVEN_HEADER)
        self._merger = RavenMerger()
        self._n = 0

    def write(self, events: Iterable[Event]) -> None:
        for e in events:
            self._merger.add(e)

    def end_file(self) -> None:
        rows = self._merger.take()
        self.stream.write_text(raven_lines(rows, self._n + 1))
        self._n += len(rows)

    def close(self) -> None:
        self.stream.close()


class RavenPerFile:
    """raven/<name>.selections.txt for each recording (its path below the input folder), written whole and renamed
    into place when the file is done: a table that exists is complete."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._mergers: dict[str, RavenMerger] = {}

    def path_for(self, rel: str) -> Path:
        return self.root / f"{rel}.selections.txt"

    def begin_file(self, key: str) -> None:
        self._mergers[key] = RavenMerger()

    def write(self, key: str, events: Iterable[Event]) -> None:
        merger = self._mergers[key]
        for e in events:
            merger.add(e)

    def end_file(self, key: str, rel: str) -> None:
        rows = self._mergers.pop(key).take()
        path = self.path_for(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(RAVEN_HEADER + raven_lines(rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def drop(self, key: str) -> None:
        self._mergers.pop(key, None)


PARQUET_HINT = "Parquet output needs pyarrow: pip install 'naturelm-edge[archive]'"


class ParquetParts:
    """parquet/source=<name>/date=<YYYY-MM-DD>/<file key>-<n>.parquet: a Hive-partitioned dataset
    (`pyarrow.dataset.dataset(dir, partitioning="hive")` reads it whole, or one source or day). A part holds up to
    `rows_per_part` rows of one file and one day, and is renamed into place complete."""

    def __init__(self, root: Path, rows_per_part: int = 20000):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            from edge.errors import ConfigError

            raise ConfigError(PARQUET_HINT) from None
        self.pa, self.pq = pa, pq
        self.root = Path(root)
        self.rows_per_part = rows_per_part
        self._buf: dict[str, dict[str, list]] = {}  # file key -> date -> rows
        self._parts: dict[str, int] = {}
        self._schema = pa.schema([
            ("event_id", pa.string()), ("seq", pa.int64()), ("file", pa.string()), ("window_index", pa.int64()),
            ("start_s", pa.float64()), ("end_s", pa.float64()), ("start_utc", pa.timestamp("ms", tz="UTC")),
            ("prompt_id", pa.string()), ("kind", pa.string()), ("answer", pa.string()), ("score", pa.float64()),
            ("positive", pa.bool_()), ("bundle_id", pa.string()), ("quantization", pa.string()),
        ])

    def begin_file(self, key: str) -> None:
        self._buf[key] = {}
        self._parts[key] = 0

    def write(self, key: str, rel: str, events: Iterable[Event]) -> None:
        days = self._buf[key]
        for e in events:
            day = e.window.start_utc.astimezone(timezone.utc).strftime("%Y-%m-%d")
            rows = days.setdefault(day, [])
            rows.append({
                "event_id": e.event_id, "seq": e.seq, "file": e.source, "window_index": e.window.index,
                "start_s": e.window.offset_s, "end_s": e.window.offset_s + e.window.duration_s,
                "start_utc": e.window.start_utc, "prompt_id": e.prompt_id, "kind": e.kind,
                "answer": None if e.answer is None else str(e.answer), "score": e.score, "positive": e.positive,
                "bundle_id": e.model.get("bundle_id"), "quantization": e.model.get("quantization"),
            })
            if len(rows) >= self.rows_per_part:
                self._flush(key, rel, day)

    def _flush(self, key: str, rel: str, day: str) -> None:
        rows = self._buf[key].pop(day, [])
        if not rows:
            return
        d = self.root / f"source={quote(rel, safe='')}" / f"date={day}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{key}-{self._parts[key]:05d}.parquet"
        self._parts[key] += 1
        tmp = d / f".{name}.tmp"  # leading dot: dataset readers skip it
        self.pq.write_table(self.pa.Table.from_pylist(rows, schema=self._schema), tmp)
        os.replace(tmp, d / name)

    def end_file(self, key: str, rel: str) -> None:
        for day in list(self._buf[key]):
            self._flush(key, rel, day)
        del self._buf[key]

    def drop(self, key: str) -> None:
        self._buf.pop(key, None)

    def purge(self, key: str) -> int:
        parts = list(self.root.rglob(f"{key}-*.parquet")) + list(self.root.rglob(f".{key}-*.tmp"))
        for p in parts:
            p.unlink()
        return len(parts)
