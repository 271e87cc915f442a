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

Faults. Only a file that is really corrupt (SQLite says "file is not a database" or "database disk image is
malformed", or `PRAGMA quick_check` does not answer "ok") is moved aside as `<name>.corrupt-<time>` and replaced by a
new one: its events are lost, and the log says so. Every other failure (the file or its directory read-only, another
process holding a write lock, a full disk, permission denied, an I/O error) is an `OutboxError` naming the path and
the cause, and the file is left exactly as it is, so its queued events are there when the cause is fixed. The
daemon's rule for those is in edge/daemon.py and systemd/README.md.

The seq high-water mark also lives outside the database, in `<name>.seq` beside it: one number, rewritten whole
(write, fsync, rename, fsync of the directory) inside every `add` transaction before its COMMIT, so it is never
behind the database. A corrupt database that is moved aside cannot take the counter with it: the new file starts at
the mark, and consumers that deduplicate on seq never take a new event for an old one. A separate file rather than a
second table or a second SQLite file: it is the state a worn card must not lose together with the outbox, so it
shares no file, no page cache of SQLite and no recovery logic with it; a whole-file atomic rename is the simplest
write that is either the old or the new value after a power cut. It costs two fsyncs per window. At open the outbox
counts on from the larger of the two, so a database that was moved aside, deleted by hand or restored from an old
copy never hands out a seq twice. The mark may run ahead of the database by one window's events (a power cut between
the mark and the COMMIT): those seqs were never stored nor published, and are skipped: a gap, never a repeat.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from edge.errors import EXIT_IOERR, EXIT_NOPERM, EXIT_TEMPFAIL, NatureLMEdgeError
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

#: How long a statement waits for another connection's write lock while the daemon runs (SQLite's busy timeout). A
#: window's commit that waits longer fails and is retried with the next window (edge/daemon.py).
BUSY_TIMEOUT_S = 10.0

#: OutboxError kinds.
LOCKED, READ_ONLY, PERMISSION, FULL, IO = "locked", "read-only", "permission", "disk-full", "io"


class OutboxError(NatureLMEdgeError):
    """The outbox cannot be written or read for a reason other than corruption; the file is left as it is.

    `kind`: locked, read-only, permission, disk-full or io."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    @property
    def exit_code(self) -> int:
        return {LOCKED: EXIT_TEMPFAIL, FULL: EXIT_TEMPFAIL, READ_ONLY: EXIT_NOPERM,
                PERMISSION: EXIT_NOPERM}.get(self.kind, EXIT_IOERR)


def _corrupt(e: sqlite3.Error) -> bool:
    """SQLITE_NOTADB or SQLITE_CORRUPT (by message: `sqlite_errorcode` is Python 3.11+, the device runs 3.10)."""
    text = str(e).lower()
    return "file is not a database" in text or "malformed" in text


def _fs_cause(path: Path) -> tuple[str, str] | None:
    """(kind, cause) from the file system itself, when it explains a failure SQLite reports vaguely."""
    for p in (path, path.parent):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return READ_ONLY, "the file system is read-only"
        if (st.f_bavail == 0 and os.geteuid() != 0) or st.f_bfree == 0:
            return FULL, "no space left on the device"
        break
    for p, what in ((path.parent, "its directory"), (path, "the file")):
        if p.exists() and not os.access(p, os.W_OK):
            return PERMISSION, f"permission denied: {what} is not writable by uid {os.geteuid()}"
    return None


def _classify(e: BaseException, path: Path) -> OutboxError:
    """One line naming the path and the cause."""
    if isinstance(e, OutboxError):
        return e
    text = str(e).strip() or type(e).__name__
    low = text.lower()
    if isinstance(e, OSError) and e.errno is not None:
        kind = {errno.EROFS: READ_ONLY, errno.EACCES: PERMISSION, errno.EPERM: PERMISSION, errno.ENOSPC: FULL,
                errno.EDQUOT: FULL}.get(e.errno, IO)
        where = getattr(e, "filename", None)
        text = f"{e.strerror}" + (f" ({where})" if where and str(where) != str(path) else "")
    elif "locked" in low or "busy" in low:
        return OutboxError(f"outbox {path}: locked by another process ({text}); its events are kept", LOCKED)
    elif "disk is full" in low:
        kind = FULL
    elif "readonly" in low or "read-only" in low:
        fs = _fs_cause(path)
        fallback = (READ_ONLY, f"{text}: the file or its directory is not writable")
        kind, text = fs if fs and fs[0] in (READ_ONLY, PERMISSION) else fallback
    else:  # "unable to open database file", "disk I/O error": say what the file system says
        fs = _fs_cause(path)
        kind, text = (fs[0], f"{fs[1]} ({text})") if fs else (IO, text)
    return OutboxError(f"outbox {path}: {kind}: {text}; its events are kept", kind)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SeqMark:
    """The seq high-water mark in its own file, `<outbox>.seq`: the next seq the outbox may hand out is at least this.

    Rewritten whole by an atomic rename; a missing or unreadable file reads as None (and is rewritten)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.value = self._read()

    def _read(self) -> int | None:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("seq mark %s is unreadable (%s); using the outbox's own counter", self.path, e)
            return None
        if not text.isdigit():
            logger.warning("seq mark %s holds %r, not a number; using the outbox's own counter", self.path, text[:40])
            return None
        return int(text)

    def write(self, value: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{int(value)}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.value = int(value)


class Outbox:
    def __init__(self, path: Path, max_bytes: int, max_events: int, open_timeout_s: float = BUSY_TIMEOUT_S):
        """`open_timeout_s`: how long opening waits for another process's write lock before OutboxError(locked)."""
        self.path = Path(path)
        self.max_bytes, self.max_events = int(max_bytes), int(max_events)
        self._open_timeout_s = float(open_timeout_s)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _classify(e, self.path) from None
        self._lock = threading.Lock()
        #: Set whenever events are added; the drainer waits on it.
        self.changed = threading.Event()
        self.mark = SeqMark(self.path.with_name(self.path.name + ".seq"))
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                raise _classify(e, self.path) from None
            self._db = self._replace_corrupt(e)
        try:
            self.depth, self.bytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events").fetchone()
            self.dropped = self._meta("dropped")
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            db_next = self._meta("next_seq")
            if self.mark.value is None or self.mark.value < db_next:
                # First start with a mark (or the mark was lost): it must never be behind the database.
                self.mark.write(db_next)
            elif self.mark.value > db_next:
                if self.depth == 0 and db_next == 0:
                    logger.warning("outbox %s is new but its seq mark %s says %d: seq continues there (the old file "
                                   "was removed or replaced)", self.path, self.mark.path, self.mark.value)
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (self.mark.value,))
        except (sqlite3.Error, OSError) as e:
            self._db.close()
            raise _classify(e, self.path) from None
        if self.depth:
            logger.info("outbox %s holds %d unsent event(s) from before (seq %d..)", self.path, self.depth,
                        self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0])

    def _replace_corrupt(self, e: sqlite3.Error) -> sqlite3.Connection:
        # A corrupt file (a worn SD card) must not keep the recorder from recording: set it aside, start afresh,
        # and carry on counting from the mark, which the corrupt file could not take with it.
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        start = self.mark.value if self.mark.value is not None else 0
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            db = self._open()
            if start:
                db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq' AND value < ?", (start, start))
        except (OSError, sqlite3.Error) as e2:
            raise _classify(e2, self.path) from None
        if self.mark.value is None:
            logger.error("outbox %s is corrupt (%s); moved it to %s and started a new one: its events are lost, and "
                         "with no seq mark (%s) seq starts again at 0", self.path, e, aside, self.mark.path)
        else:
            logger.error("outbox %s is corrupt (%s); moved it to %s and started a new one: its events are lost; seq "
                         "continues at %d", self.path, e, aside, start)
        return db

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), as sqlite3's implicit ones
        # are easy to leave open by accident across threads.
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                             timeout=self._open_timeout_s)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError(f"database disk image is malformed: quick_check says "
                                            f"{'; '.join(str(r[0]) for r in check[:3])}")
        except BaseException:
            db.close()
            raise
        return db

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")

    def add(self, events: Iterable[Event]) -> list[int]:
        """Store events (one window's worth) in one transaction, giving each the next `seq` (set on the Event too).
        Returns their seqs. Raises OutboxError (nothing stored, no seq used) when the file cannot be written."""
        events = list(events)
        if not events:
            return []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise _classify(e, self.path) from None
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
                # The mark first: if the COMMIT is then lost, the mark is ahead (harmless), never behind.
                self.mark.write(seq)
                self._db.execute("COMMIT")
            except BaseException as e:
                self._rollback()
                if isinstance(e, (sqlite3.Error, OSError)):
                    raise _classify(e, self.path) from None
                raise
        if dropped:
            logger.warning("outbox full (%d events, %d bytes): dropped the %d oldest unsent event(s); %d dropped so far",
                           self.depth, self.bytes, dropped, self.dropped)
        self.changed.set()
        return seqs

    def _rollback(self) -> None:
        """Inside the lock: undo the open transaction and re-read the counters it had changed."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self.depth, self.bytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events").fetchone()
            self.dropped = self._meta("dropped")
        except sqlite3.Error as e:  # the cause is reported by the caller; this is its echo
            logger.debug("outbox rollback: %s", e)

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
        """Delete acknowledged events. Unknown seqs (already dropped or removed) are ignored. Raises OutboxError when
        the file cannot be written (the events stay, and are sent again after a restart: a duplicate, never a loss)."""
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                got = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events WHERE seq IN ({','.join('?' * len(seqs))})",
                    seqs).fetchone()
                self._db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in seqs])
                self._db.execute("COMMIT")
            except BaseException as e:
                self._rollback()
                if isinstance(e, sqlite3.Error):
                    raise _classify(e, self.path) from None
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
