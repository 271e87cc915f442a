"""The durable outbox: every event is written here before any attempt to publish it, and leaves only when the broker
has acknowledged it. Power cuts, reboots and weeks without network lose nothing that fits in the bound.

The outbox also owns the per-device `seq`: it is assigned in the same transaction that stores the event, from a
counter kept in the database, so it increases by one per event across restarts and never repeats.

SQLite in WAL mode with synchronous=FULL. In WAL mode NORMAL is already safe against a crash of the process (SIGKILL,
OOM), but not against a power cut, which can roll back the last commits. A field recorder on batteries or solar loses
power as a matter of course, and a rolled-back commit would hand out the same `seq` twice to different events (and
lose events that were reported stored). FULL costs one fsync per window's commit, a few per minute: nothing.

Bounded by `max_events` and `max_bytes` (of payload): when full, the oldest events are dropped and counted, because on
a device that cannot reach its broker for a month the newest observations are the ones worth keeping.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from edge.events import Event

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 0), ('dropped', 0);
"""


class Outbox:
    def __init__(self, path: Path, max_bytes: int, max_events: int):
        self.path = Path(path)
        self.max_bytes, self.max_events = int(max_bytes), int(max_events)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        #: Set whenever events are added; the drainer waits on it.
        self.changed = threading.Event()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            # A corrupt file (a worn SD card) must not keep the recorder from recording: set it aside, start afresh.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            logger.error("outbox %s is unreadable (%s); moved it to %s and started a new one: its events are lost "
                         "and seq starts again at 0", self.path, e, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._db = self._open()
        self.depth, self.bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events").fetchone()
        self.dropped = self._meta("dropped")
        if self.depth:
            logger.info("outbox %s holds %d unsent event(s) from before (seq %d..)", self.path, self.depth,
                        self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0])

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), as sqlite3's implicit ones
        # are easy to leave open by accident across threads.
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute("PRAGMA quick_check").fetchone()
        return db

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")

    def add(self, events: Iterable[Event]) -> list[int]:
        """Store events (one window's worth) in one transaction, giving each the next `seq` (set on the Event too).
        Returns their seqs."""
        events = list(events)
        if not events:
            return []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq")
                rows, seqs = [], []
                now = time.time()
                for ev in events:
                    ev.seq = seq
                    payload = ev.to_json()
                    rows.append((seq, ev.event_id, payload, len(payload.encode("utf-8")), now))
                    seqs.append(seq)
                    seq += 1
                self._db.executemany("INSERT INTO events (seq, event_id, payload, bytes, created) VALUES (?,?,?,?,?)",
                                     rows)
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq,))
                self.depth += len(rows)
                self.bytes += sum(r[3] for r in rows)
                dropped = self._trim()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self.depth, self.bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events").fetchone()
                raise
        if dropped:
            logger.warning("outbox full (%d events, %d bytes): dropped the %d oldest unsent event(s); %d dropped so far",
                           self.depth, self.bytes, dropped, self.dropped)
        self.changed.set()
        return seqs

    def _trim(self) -> int:
        """Inside a transaction: delete the oldest rows until both bounds hold."""
        dropped = 0
        while self.depth > self.max_events or self.bytes > self.max_bytes:
            over_n = self.depth - self.max_events
            cut = self._db.execute("SELECT seq, bytes FROM events ORDER BY seq LIMIT ?",
                                   (max(over_n, 256),)).fetchall()
            if not cut:
                break
            # Enough rows for the event bound, then only as many more as the byte bound needs.
            take, excess = max(over_n, 0), self.bytes - self.max_bytes
            excess -= sum(b for _, b in cut[:take])
            while excess > 0 and take < len(cut):
                excess -= cut[take][1]
                take += 1
            cut = cut[:max(take, 1)]
            self._db.execute("DELETE FROM events WHERE seq <= ?", (cut[-1][0],))
            self.depth -= len(cut)
            self.bytes -= sum(b for _, b in cut)
            dropped += len(cut)
        if dropped:
            self.dropped += dropped
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (self.dropped,))
        return dropped

    def peek(self, limit: int, after_seq: int = -1) -> list[tuple[int, str]]:
        """Up to `limit` (seq, payload) in seq order, starting after `after_seq`."""
        with self._lock:
            return self._db.execute("SELECT seq, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after_seq, limit)).fetchall()

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged events. Unknown seqs (already dropped or removed) are ignored."""
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                got = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events WHERE seq IN ({','.join('?' * len(seqs))})",
                    seqs).fetchone()
                self._db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in seqs])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self.depth -= got[0]
            self.bytes -= got[1]
            return got[0]

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                logger.debug("outbox checkpoint on close failed: %s", e)
            self._db.close()
