"""The outbox under faults, on real files: only real corruption moves a file aside; a read-only file system, a write
lock held by another process and a full disk are errors naming the path and the cause, with the queued events kept;
seq never goes backwards, not even past a corrupt file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from disk_faults import fill_disk
from test_outbox import make_events

from edge.outbox import FULL, LOCKED, READ_ONLY, Outbox, OutboxError


def _new(path, **kw) -> Outbox:
    return Outbox(path, max_bytes=10**7, max_events=1000, **kw)


def _seqs(box: Outbox) -> list[int]:
    return [s for s, _ in box.peek(1000)]


class LockHolder:
    """Another process that holds SQLite's write lock on a file (`BEGIN EXCLUSIVE`) until released."""

    def __init__(self, path):
        code = textwrap.dedent(f"""
            import sqlite3, sys
            db = sqlite3.connect({str(path)!r}, isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            sys.stdin.readline()
            db.execute("ROLLBACK")
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(10)


def test_locked_by_another_process_is_not_corruption(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = _new(path)
    box.add(make_events(3))
    box.close()
    holder = LockHolder(path)
    try:
        with pytest.raises(OutboxError) as e:
            _new(path, open_timeout_s=0.3)
        assert e.value.kind == LOCKED and e.value.exit_code == 75
        msg = str(e.value)
        assert str(path) in msg and "locked by another process" in msg and "\n" not in msg
        assert not list(tmp_path.glob("*.corrupt-*"))
    finally:
        holder.release()
    box = _new(path)
    assert _seqs(box) == [0, 1, 2]  # the queued events survived
    assert box.add(make_events(1)) == [3]


def test_a_lock_taken_while_running_fails_the_add_and_uses_no_seq(tmp_path, monkeypatch):
    import edge.outbox

    monkeypatch.setattr(edge.outbox, "BUSY_TIMEOUT_S", 0.3)
    path = tmp_path / "o.sqlite3"
    box = _new(path)
    assert box.add(make_events(2)) == [0, 1]
    holder = LockHolder(path)
    try:
        with pytest.raises(OutboxError) as e:
            box.add(make_events(2))
        assert e.value.kind == LOCKED
        assert box.depth == 2
    finally:
        holder.release()
    assert box.add(make_events(2)) == [2, 3]  # nothing skipped, nothing reused
    assert box.remove([0]) == 1
    assert _seqs(box) == [1, 2, 3]


def test_read_only_file_system_names_the_cause_and_keeps_the_events(tmpfs):
    fs = tmpfs("state")
    path = fs / "o.sqlite3"
    box = _new(path)
    box.add(make_events(3))
    box.close()
    tmpfs.remount(fs, "ro")
    with pytest.raises(OutboxError) as e:
        _new(path)
    msg = str(e.value)
    assert e.value.kind == READ_ONLY and e.value.exit_code == 77, msg
    assert str(path) in msg and "read-only" in msg and "No such file" not in msg and "lost" not in msg
    assert sorted(p.name for p in fs.iterdir()) == ["o.sqlite3", "o.sqlite3.seq"]  # nothing renamed
    tmpfs.remount(fs, "rw")
    box = _new(path)
    assert _seqs(box) == [0, 1, 2]
    assert box.add(make_events(1)) == [3]


def test_read_only_state_directory_at_first_start(tmpfs):
    fs = tmpfs("state")
    tmpfs.remount(fs, "ro")
    with pytest.raises(OutboxError) as e:
        _new(fs / "o.sqlite3")
    assert e.value.kind == READ_ONLY and str(fs / "o.sqlite3") in str(e.value), str(e.value)


def test_full_disk_fails_the_add_then_recovers_without_a_gap(tmpfs):
    fs = tmpfs("state", size="2m")
    box = _new(fs / "o.sqlite3")
    assert box.add(make_events(2)) == [0, 1]
    filler = fill_disk(fs)
    with pytest.raises(OutboxError) as e:
        for i in range(50):  # SQLite may still find room in pages it holds; the disk runs out within a few adds
            box.add(make_events(5, index=i))
    assert e.value.kind == FULL and e.value.exit_code == 75, str(e.value)
    assert str(fs / "o.sqlite3") in str(e.value)
    stored = _seqs(box)
    assert stored == list(range(len(stored)))  # whatever got in is contiguous
    filler.unlink()
    assert box.add(make_events(1)) == [len(stored)]
    box.close()
    assert _seqs(_new(fs / "o.sqlite3")) == list(range(len(stored) + 1))


def test_seq_mark_is_never_behind_the_database(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = _new(path)
    for i in range(4):
        box.add(make_events(3, index=i))
        assert int((tmp_path / "o.sqlite3.seq").read_text()) == box.next_seq
    box.close()


def test_seq_continues_past_a_corrupt_file(tmp_path, caplog):
    path = tmp_path / "o.sqlite3"
    box = _new(path)
    box.add(make_events(7))
    box.remove([0, 1])
    box.close()
    # A worn card: the middle of the file becomes garbage (the header survives, so SQLite opens it).
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:] = b"\xa5" * (len(data) - 4096)
    path.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"o.sqlite3{suffix}").unlink(missing_ok=True)
    box = _new(path)
    assert len(list(tmp_path.glob("o.sqlite3.corrupt-*"))) == 1
    assert box.add(make_events(2)) == [7, 8]  # not 0: consumers deduplicating on seq would drop these
    assert any("corrupt" in r.getMessage() and "seq continues at 7" in r.getMessage() for r in caplog.records)


def test_not_a_database_is_set_aside_and_keeps_counting(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = _new(path)
    box.add(make_events(5))
    box.close()
    path.write_bytes(b"this is not a database" * 200)
    box = _new(path)
    assert box.add(make_events(1)) == [5]
    assert len(list(tmp_path.glob("o.sqlite3.corrupt-*"))) == 1


def test_a_deleted_or_old_outbox_file_never_reuses_a_seq(tmp_path, caplog):
    path = tmp_path / "o.sqlite3"
    box = _new(path)
    box.add(make_events(4))
    box.close()
    old_copy = path.read_bytes()
    box = _new(path)
    box.add(make_events(3))  # seq 4..6
    box.close()
    path.write_bytes(old_copy)  # restored from a backup that knows only seq 0..3
    box = _new(path)
    assert box.add(make_events(1)) == [7]
    box.close()
    for suffix in ("", "-wal", "-shm"):  # removed by hand
        (tmp_path / f"o.sqlite3{suffix}").unlink(missing_ok=True)
    box = _new(path)
    assert box.add(make_events(1)) == [8]
    assert any("seq continues there" in r.getMessage() for r in caplog.records)


def test_permission_denied_is_named_as_such_for_a_non_root_daemon(tmp_path):
    """The daemon runs as its own user (systemd's User=naturelm): a state directory it cannot write is one line
    saying so, not a corrupt file. Here as `nobody`, with the system's Python (the test venv is under /root)."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root (to switch to nobody) and a system python3")
    root = Path(__file__).resolve().parents[1]
    state = Path(tempfile.mkdtemp(prefix="outbox-perm-", dir="/tmp"))
    try:
        os.chmod(state, 0o755)  # nobody may look, not write
        box = _new(state / "o.sqlite3")
        box.add(make_events(2))
        box.close()
        os.chmod(state / "o.sqlite3", 0o644)
        code = textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {str(root)!r})
            from edge.outbox import Outbox, OutboxError
            try:
                Outbox({str(state / 'o.sqlite3')!r}, 10**7, 1000, open_timeout_s=0.5)
                print(json.dumps({{"opened": True}}))
            except OutboxError as e:
                print(json.dumps({{"kind": e.kind, "exit_code": e.exit_code, "message": str(e)}}))
        """)

        def as_nobody():
            os.setgid(65534)
            os.setuid(65534)

        r = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, timeout=60,
                           preexec_fn=as_nobody, cwd="/", env={"PATH": "/usr/bin:/bin"})
        if r.returncode != 0 and "ModuleNotFoundError" in r.stderr:
            pytest.skip(f"the system python3 cannot import the outbox: {r.stderr.strip().splitlines()[-1]}")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got.get("kind") == "permission" and got["exit_code"] == 77, got
        assert str(state / "o.sqlite3") in got["message"] and "permission denied" in got["message"], got
        assert "uid 65534" in got["message"], got
        assert sorted(p.name for p in state.iterdir()) == ["o.sqlite3", "o.sqlite3.seq"]
        assert _seqs(_new(state / "o.sqlite3")) == [0, 1]
    finally:
        shutil.rmtree(state, ignore_errors=True)
