"""The ledger of an archive run (`naturelm-edge infer --out-dir`): which recordings are finished, under which model
and prompts, so that `--resume` skips them and nothing is written twice.

Why SQLite (the standard library's sqlite3): a ledger must survive the process being killed at any instant. A
transaction either happened or did not, so "file done" and "where its outputs end" change together or not at all; a
JSON file rewritten in place can be caught half-written. It is one file next to the outputs, readable with the
`sqlite3` shell (`select path, status, windows from files`), and the outbox already trusts it on the device.

A file is identified by its resolved path and checked by size and modification time (a re-copied card reruns); the
run by the bundle id and a hash of the prompt list with the settings that change answers (window, hop, gate,
precision, LLM quantization). A row whose identity or run differs is stale: the file runs again and its earlier
outputs are removed first.

Each file's row records where its lines start in the appended JSONL and CSV streams (`jsonl_start`, `csv_start`), so
that lines of a file that never finished (a kill, a lost worker) can be found and removed before it runs again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ConfigError

_SCHEMA = """
create table if not exists files (
    path text primary key,          -- resolved absolute path
    source text not null,           -- the `source` written into its events
    size integer not null,
    mtime_ns integer not null,
    bundle_id text not null,
    prompts_hash text not null,
    status text not null check (status in ('running', 'done', 'failed')),
    windows integer not null default 0,
    windows_failed integer not null default 0,
    events integer not null default 0,
    jsonl_start integer,
    csv_start integer,
    error text,
    started_at real,
    finished_at real
);
create table if not exists window_errors (
    path text not null,
    window_index integer not null,
    offset_s real not null,
    error text not null,
    primary key (path, window_index)
);
create table if not exists meta (key text primary key, value text not null);
"""


def prompts_hash(prompts, **settings) -> str:
    """sha256 over the prompt list and the settings that change answers; 16 hex digits are plenty to tell runs
    apart."""
    doc = {"prompts": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(p).items()} for p in prompts],
           "settings": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FileId:
    path: str  # resolved
    source: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, source: str) -> FileId:
        st = Path(path).stat()
        return cls(str(Path(path).resolve()), source, st.st_size, st.st_mtime_ns)


class Ledger:
    def __init__(self, path: Path, bundle_id: str, prompts_hash: str):
        self.path = Path(path)
        self.bundle_id = bundle_id
        self.prompts_hash = prompts_hash
        # One run per output folder: two writers would interleave their lines and purge each other's.
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(f"{self.path.parent}: another `infer` is writing there (its ledger is locked); wait "
                              "for it, or give another --out-dir") from None
        self.db = sqlite3.connect(str(self.path), isolation_level=None)  # explicit transactions below
        self.db.execute("pragma journal_mode=wal")
        self.db.execute("pragma synchronous=full")  # a commit that returned is on disk
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    def _tx(self, sql: str, args=()) -> None:
        with self.db:
            self.db.execute("begin immediate")
            self.db.execute(sql, args)

    # --- what is done, what must be cleaned ------------------------------------------------------------------------

    def row(self, path: str) -> dict | None:
        cur = self.db.execute("select * from files where path = ?", (path,))
        r = cur.fetchone()
        return None if r is None else dict(zip([c[0] for c in cur.description], r))

    def is_done(self, f: FileId, retry_failed_windows: bool = False) -> bool:
        r = self.row(f.path)
        return (r is not None and r["status"] == "done" and r["size"] == f.size and r["mtime_ns"] == f.mtime_ns
                and r["bundle_id"] == self.bundle_id and r["prompts_hash"] == self.prompts_hash
                and not (retry_failed_windows and r["windows_failed"]))

    def unfinished(self) -> list[dict]:
        """Rows of files that started and never finished (the run was killed or a worker was lost)."""
        cur = self.db.execute("select * from files where status = 'running'")
        return [dict(zip([c[0] for c in cur.description], r)) for r in cur.fetchall()]

    def forget(self, paths: list[str]) -> None:
        with self.db:
            self.db.execute("begin immediate")
            self.db.executemany("delete from files where path = ?", [(p,) for p in paths])
            self.db.executemany("delete from window_errors where path = ?", [(p,) for p in paths])

    def next_seq(self) -> int:
        r = self.db.execute("select value from meta where key = 'next_seq'").fetchone()
        return int(r[0]) if r else 0

    # --- a file's life ----------------------------------------------------------------------------------------------

    def start(self, f: FileId, jsonl_start: int | None, csv_start: int | None) -> None:
        with self.db:
            self.db.execute("begin immediate")
            self.db.execute("delete from window_errors where path = ?", (f.path,))
            self.db.execute(
                "insert or replace into files (path, source, size, mtime_ns, bundle_id, prompts_hash, status, "
                "jsonl_start, csv_start, started_at) values (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (f.path, f.source, f.size, f.mtime_ns, self.bundle_id, self.prompts_hash, jsonl_start, csv_start,
                 time.time()))

    def window_failed(self, f: FileId, index: int, offset_s: float, error: str) -> None:
        self._tx("insert or replace into window_errors values (?, ?, ?, ?)", (f.path, index, offset_s, error))

    def finish(self, f: FileId, *, windows: int, windows_failed: int, events: int, next_seq: int,
               error: str | None = None) -> None:
        """The file is done (or failed as a whole): its outputs must already be flushed to disk."""
        with self.db:
            self.db.execute("begin immediate")
            self.db.execute(
                "update files set status = ?, windows = ?, windows_failed = ?, events = ?, error = ?, "
                "finished_at = ? where path = ?",
                ("failed" if error else "done", windows, windows_failed, events, error, time.time(), f.path))
            self.db.execute("insert or replace into meta values ('next_seq', ?)", (str(next_seq),))

    def summary(self) -> dict:
        rows = self.db.execute("select status, count(*), sum(windows), sum(windows_failed), sum(events) from files "
                               "group by status").fetchall()
        return {s: {"files": n, "windows": w or 0, "windows_failed": wf or 0, "events": e or 0}
                for s, n, w, wf, e in rows}
