"""The durable outbox: seq survives restarts, bounds drop the oldest (counted), acknowledged events leave."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone

import jsonschema

from edge.events import Event, WindowInfo, load_schema
from edge.outbox import Outbox


def make_events(n: int, index: int = 0) -> list[Event]:
    w = WindowInfo(index=index, offset_s=index * 5.0, duration_s=10.0, start_utc=datetime.now(timezone.utc))
    return [Event(device_id="rec-1", source="mic", window=w, prompt_id=f"p{i}", kind="yes_no", answer="No",
                  score=0.1, model={"bundle_id": "b", "quantization": "Q4_K_M", "encoder_provider": "cpu"},
                  timing_ms={"llm": 3.0}, positive=False) for i in range(n)]


def test_seq_is_assigned_durably_and_survives_a_restart(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**7, max_events=1000)
    events = make_events(3)
    assert box.add(events) == [0, 1, 2]
    assert [e.seq for e in events] == [0, 1, 2]
    box.remove([0, 1, 2])
    assert box.depth == 0
    box.close()

    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**7, max_events=1000)
    assert box.add(make_events(2)) == [3, 4]  # never reused, even after the table emptied
    rows = box.peek(10)
    assert [s for s, _ in rows] == [3, 4]
    schema = load_schema()
    for seq, payload in rows:
        ev = json.loads(payload)
        jsonschema.validate(ev, schema)
        assert ev["seq"] == seq
    box.close()


def test_wal_and_full_sync(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**7, max_events=1000)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    box.close()


def test_unsent_events_survive_a_crash(tmp_path):
    """No close(): the process dies with the connection open (SIGKILL). A new outbox sees every committed event."""
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**7, max_events=1000)
    box.add(make_events(5))
    box.remove([1])
    again = Outbox(tmp_path / "o.sqlite3", max_bytes=10**7, max_events=1000)
    assert [s for s, _ in again.peek(100)] == [0, 2, 3, 4]
    assert again.depth == 4 and again.next_seq == 5


def test_event_bound_drops_the_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**9, max_events=10)
    for i in range(5):
        box.add(make_events(3, index=i))  # 15 events
    assert box.depth == 10 and box.dropped == 5
    assert [s for s, _ in box.peek(100)] == list(range(5, 15))
    box.close()
    again = Outbox(tmp_path / "o.sqlite3", max_bytes=10**9, max_events=10)
    assert again.dropped == 5  # the count is durable too


def test_byte_bound_drops_the_oldest(tmp_path):
    one = len(make_events(1)[0].to_json())
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=one * 4 + 10, max_events=1000)
    for i in range(10):
        box.add(make_events(1, index=i))
    assert box.depth == 4 and box.dropped == 6
    assert box.bytes <= one * 4 + 10
    assert [s for s, _ in box.peek(100)] == [6, 7, 8, 9]


def test_peek_after_and_remove_unknown(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**7, max_events=1000)
    box.add(make_events(6))
    assert [s for s, _ in box.peek(2, after_seq=1)] == [2, 3]
    assert box.remove([2, 3, 99]) == 2
    assert box.depth == 4


def test_a_corrupt_outbox_is_set_aside(tmp_path):
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path, max_bytes=10**7, max_events=1000)
    assert box.add(make_events(1)) == [0]
    assert len(list(tmp_path.glob("o.sqlite3.corrupt-*"))) == 1
    with sqlite3.connect(str(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
