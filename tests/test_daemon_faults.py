"""The field daemon under faults, black box (`python -m edge.cli run` as a subprocess): an outbox another process has
locked, a read-only state directory, a disk that fills up while it records (a real tmpfs), a dead microphone at
boot, and a file source that is not audio."""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import yaml
from disk_faults import fill_disk
from mqtt_broker import Subscriber
from test_daemon_e2e import FAKE_SD_DIR, PROMPTS, NotifySocket, _config, _until, _wav
from test_outbox import make_events
from test_outbox_faults import LockHolder

from edge.outbox import Outbox


def _no_model_config(tmp_path, state_dir, **over):
    """Enough for the daemon to reach its outbox: it opens the outbox before it loads any model."""
    (tmp_path / "bundle").mkdir(exist_ok=True)
    wav = _wav(tmp_path / "a.wav", 1.0)
    cfg = {"device_id": "rec-faults", "state_dir": str(state_dir), "bundle": {"path": "bundle"},
           "source": {"type": "file", "file": {"path": str(wav)}}, "prompts": PROMPTS,
           "mqtt": {"host": "127.0.0.1", "port": 9}, **over}
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _last_line(d) -> str:
    return d.log.strip().splitlines()[-1]


def test_an_outbox_locked_by_another_process_is_retried_then_exit_75(tmp_path, daemons):
    state = tmp_path / "state"
    box = Outbox(state / "outbox.sqlite3", 10**7, 1000)
    box.add(make_events(3))
    box.close()
    holder = LockHolder(state / "outbox.sqlite3")
    try:
        d = daemons(_no_model_config(tmp_path, state, outbox={"lock_timeout_s": 2.5}))
        assert d.wait(60) == 75, d.log
        last = _last_line(d)
        assert last.startswith(f"naturelm-edge: error: outbox {state / 'outbox.sqlite3'}: locked by another process")
        assert "gave up after 2.5 s (outbox.lock_timeout_s)" in last
        assert "; waiting up to 1 s more for the lock" in d.log  # it said so, and waited, before giving up
        assert "Traceback" not in d.log and "corrupt" not in d.log
    finally:
        holder.release()
    assert sorted(p.name for p in state.iterdir() if "corrupt" in p.name) == []
    with sqlite3.connect(str(state / "outbox.sqlite3")) as db:
        assert [r[0] for r in db.execute("SELECT seq FROM events ORDER BY seq")] == [0, 1, 2]


def test_a_read_only_state_directory_is_one_line_and_exit_77(tmp_path, tmpfs, daemons):
    state = tmpfs("state")
    box = Outbox(state / "outbox.sqlite3", 10**7, 1000)
    box.add(make_events(2))
    box.close()
    tmpfs.remount(state, "ro")
    d = daemons(_no_model_config(tmp_path, state))
    assert d.wait(60) == 77, d.log
    assert _last_line(d) == (f"naturelm-edge: error: outbox {state / 'outbox.sqlite3'}: read-only: the file system is "
                             "read-only (unable to open database file); its events are kept")
    assert "Traceback" not in d.log and "lost" not in d.log and "No such file" not in d.log
    assert sorted(p.name for p in state.iterdir()) == ["outbox.sqlite3", "outbox.sqlite3.seq"]


def test_a_full_disk_fails_windows_counted_degraded_and_the_loop_goes_on(tiny_full_bundle, mqtt_broker, daemons,
                                                                          tmp_path, tmpfs):
    """State (outbox, embeddings) on a real 3 MiB tmpfs that the test fills while the daemon records."""
    state = tmpfs("state", size="3m")
    wav = _wav(tmp_path / "a.wav", 4.0)
    cfg = _config(tmp_path, tiny_full_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": True, "loop": True}},
                  state_dir=str(state), embeddings={"enabled": True},
                  windowing={"window_s": 1.0, "hop_s": 0.5, "max_pending": 4})
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg)
    _until(lambda: len(sub.events()) >= 6, 90, "events before the disk fills", d)

    filler = fill_disk(state)

    def health():
        hs = [json.loads(p) for p in sub.on("/health")]
        return hs[-1] if hs else {}

    _until(lambda: health().get("windows_failed", 0) >= 4, 60, "windows failing on the full disk", d)
    sub.wait_for(lambda s: any("windows_failing" in json.loads(p)["reasons"] for p in s.on("/degraded")),
                 timeout=30, what="degraded: windows_failing")
    assert sub.on("/status")[-1] == "degraded"
    h = health()
    assert "disk" in h["last_window_error"]["error"] and str(state) in h["last_window_error"]["error"], h
    assert h["events_held"] > 0
    assert d.proc.poll() is None  # the inference thread and the daemon are alive

    filler.unlink()
    _until(lambda: "writable again: stored" in d.log, 60, "the held events stored", d)
    sub.wait_for(lambda s: not json.loads(s.on("/degraded")[-1])["reasons"].get("windows_failing"),
                 timeout=30, what="windows_failing cleared")
    _until(lambda: health().get("windows_failed_in_a_row", 1) == 0 and health().get("events_held", 1) == 0, 30,
           "health back to normal", d)
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log

    log = d.log
    failed_lines = [ln for ln in log.splitlines() if " failed: outbox " in ln]
    assert 1 <= len(failed_lines) <= 2, failed_lines  # once per cause, not once per window
    assert "Traceback" not in log
    seqs = sorted(e["seq"] for e in sub.events())
    distinct = sorted(set(seqs))
    assert distinct == list(range(len(distinct))), "a seq was skipped"
    by_seq = {}
    for e in sub.events():
        assert by_seq.setdefault(e["seq"], e["event_id"]) == e["event_id"], "one seq, two events"
    sub.close()


def test_no_microphone_at_boot_feeds_the_watchdog_says_no_audio_and_recovers(tiny_full_bundle, mqtt_broker, daemons,
                                                                               tmp_path):
    """A recorder booted without its microphone: no restart loop (the watchdog is fed), a retained `degraded`
    status naming the problem, and recording once the device appears. A restart (as after any fault) finds the
    bundle's hashes in the state directory's cache and does not hash it again."""
    control = tmp_path / "sd"
    control.mkdir()
    (control / "absent").touch()
    notify = NotifySocket(tmp_path / "notify")
    cfg = _config(tmp_path, tiny_full_bundle, mqtt_broker.port,
                  {"type": "mic", "mic": {"device": "USB", "block_s": 0.05}, "stall_timeout_s": 0.5,
                   "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 0.5},
                  windowing={"window_s": 1.0, "hop_s": 1.0})
    cfg.write_text(cfg.read_text().replace("verify: size", "verify: full"))
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", "FAKE_SD_CONTROL": str(control)}
    d = daemons(cfg, env=env, pythonpath=[FAKE_SD_DIR])
    _until(lambda: notify.has("READY=1"), 60, "READY=1", d)
    assert ", 0 unchanged since verified" in d.log  # the first start hashes the bundle
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["degraded"] and "cannot open the microphone" in
                 json.loads(s.on("/degraded")[-1])["reasons"].get("no_audio", {}).get("reason", ""),
                 timeout=20, what="degraded: no_audio at boot")
    reason = json.loads(sub.on("/degraded")[-1])["reasons"]["no_audio"]["reason"]
    assert reason.startswith("no audio since 20"), reason
    t0 = time.monotonic()
    time.sleep(3.0)
    assert len(notify.pings(since=t0)) >= 4, "the watchdog must be fed while the microphone is missing"
    assert d.proc.poll() is None

    (control / "absent").unlink()  # plugged in
    _until(lambda: len(sub.events()) >= 3, 30, "events once the microphone is there", d)
    sub.wait_for(lambda s: "no_audio" not in json.loads(s.on("/degraded")[-1])["reasons"], timeout=15,
                 what="no_audio cleared")
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log

    again = daemons(cfg, env=env, pythonpath=[FAKE_SD_DIR])
    _until(lambda: "unchanged since verified" in again.log, 60, "the bundle check on restart", again)
    line = next(ln for ln in again.log.splitlines() if "unchanged since verified" in ln)
    assert "0 hashed now" in line, line
    again.signal(signal.SIGTERM)
    assert again.wait(60) == 0, again.log
    sub.close()
    notify.close()


def test_a_file_source_that_is_not_audio_exits_at_once_naming_it(tmp_path, daemons):
    (tmp_path / "bundle").mkdir()
    notes = tmp_path / "notes.wav"
    notes.write_text("field notes, not a recording\n")
    cfg = _no_model_config(tmp_path, tmp_path / "state")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "a.wav"), str(notes)))
    d = daemons(cfg)
    assert d.wait(30) == 2, d.log
    assert _last_line(d).startswith(f"naturelm-edge: error: {cfg}: source.file.path: {notes}: not a readable audio "
                                    "file (")
    assert "retrying" not in d.log and "Traceback" not in d.log


def test_bundle_hashes_are_verified_once_per_file_identity(tmp_path, monkeypatch):
    import os

    import edge.bundle
    from edge.bundle import load_bundle, update_manifest
    from edge.errors import BundleError

    b = tmp_path / "bundle"
    b.mkdir()
    (b / "a.bin").write_bytes(os.urandom(4096))
    (b / "b.bin").write_bytes(os.urandom(4096))
    update_manifest(b, "audio", {}, files=["a.bin", "b.bin"])
    hashed = []
    real = edge.bundle.sha256_file
    monkeypatch.setattr(edge.bundle, "sha256_file", lambda p: (hashed.append(p.name), real(p))[1])
    state = tmp_path / "state"

    load_bundle(b, verify="full", cache_dir=state)
    assert sorted(hashed) == ["a.bin", "b.bin"]
    load_bundle(b, verify="full", cache_dir=state)
    assert len(hashed) == 2  # a restart hashes nothing

    # Same size, new bytes (a bad copy, an edit): a new mtime, so it is hashed again, and refused.
    data = bytearray((b / "a.bin").read_bytes())
    data[100] ^= 0xFF
    (b / "a.bin").write_bytes(bytes(data))
    os.utime(b / "a.bin", ns=(1, 1))
    try:
        load_bundle(b, verify="full", cache_dir=state)
        raise AssertionError("a changed file passed")
    except BundleError as e:
        assert "a.bin: sha256" in str(e)
    assert hashed[2:] == ["a.bin"]
    # Without a cache directory (check-config, infer) every file is hashed, as before.
    update_manifest(b, "audio", {}, files=["a.bin"])
    hashed.clear()
    load_bundle(b, verify="full")
    assert sorted(hashed) == ["a.bin", "b.bin"]


def test_a_window_that_raises_is_counted_logged_once_and_the_worker_goes_on(tmp_path, monkeypatch, caplog):
    """In process, with a stand-in pipeline that raises on demand (a bug, not an OSError): one traceback for the
    cause, a count per window, `windows_failing` after three in a row, cleared by the next success."""
    import logging
    import threading

    import numpy as np
    import soundfile as sf
    from fake_pipeline import FakePipeline

    import edge.daemon
    from edge.config import load_config

    class Flaky(FakePipeline):
        fail = False

        def process(self, samples, sample_rate, window, source):
            if self.fail:
                raise RuntimeError("index 7 is out of bounds for axis 0 with size 4")
            return super().process(samples, sample_rate, window, source)

    sf.write(str(tmp_path / "a.wav"), 0.2 * np.ones(8000 * 3, dtype=np.float32), 8000)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump({
        "device_id": "rec-flaky", "state_dir": str(tmp_path / "state"), "bundle": {"path": "bundle"},
        "source": {"type": "file", "file": {"path": "a.wav", "realtime": True, "loop": True}},
        "windowing": {"window_s": 0.5, "hop_s": 0.25},
        "prompts": [{"id": "p", "kind": "yes_no", "text": "Yes or no?"}],
        "mqtt": {"host": "127.0.0.1", "port": 9, "reconnect_min_delay_s": 5},
    }))
    pipeline = Flaky([], "rec-flaky")
    monkeypatch.setattr(edge.daemon, "_open_pipeline", lambda cfg: (pipeline.set_prompts(cfg.prompts), pipeline)[1])
    daemon = edge.daemon.Daemon(load_config(tmp_path / "daemon.yaml"))
    caplog.set_level(logging.INFO)
    t = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    t.start()

    def until(pred, what):
        deadline = time.monotonic() + 20
        while not pred():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    try:
        until(lambda: daemon.counters.processed >= 2, "windows before the fault")
        pipeline.fail = True
        until(lambda: daemon.counters.failed >= 5, "failing windows")
        assert daemon._worker.is_alive()
        assert "windows_failing" in daemon.degraded.reasons()
        assert daemon.degraded.reasons()["windows_failing"].endswith(
            "RuntimeError: index 7 is out of bounds for axis 0 with size 4")
        h = daemon.health()
        assert h["windows_failed"] >= 5 and h["windows_failed_in_a_row"] >= 5
        assert h["last_window_error"]["error"] == "RuntimeError: index 7 is out of bounds for axis 0 with size 4"
        pipeline.fail = False
        until(lambda: daemon.counters.failed_in_a_row == 0, "a window succeeding again")
        until(lambda: "windows_failing" not in daemon.degraded.reasons(), "windows_failing cleared")
    finally:
        pipeline.fail = False
        daemon.stop()
        t.join(30)
    assert not t.is_alive()
    failed = [r for r in caplog.records if "failed: RuntimeError" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None  # once, with the traceback a bug deserves
    assert any("windows succeed again after" in r.getMessage() for r in caplog.records)


def test_embedding_index_compaction_that_fails_does_not_fail_the_window(tmp_path, caplog):
    """The issue's example: an OSError while compacting the embeddings index used to end the inference thread. Here
    the compaction's temporary file cannot be written (a directory is in its way, a real OSError): the embeddings are
    still saved, one warning, and the index is compacted once it can be."""
    from datetime import datetime, timezone

    import numpy as np

    from edge.config import StoreConfig
    from edge.events import WindowInfo
    from edge.stores import EmbeddingStore

    d = tmp_path / "emb"
    store = EmbeddingStore(StoreConfig(enabled=True, dir=d, max_bytes=2000))  # room for a few files only
    (d / "index.jsonl.tmp").mkdir()
    start = datetime(2026, 5, 1, tzinfo=timezone.utc)
    for i in range(130):
        info = WindowInfo(index=i, offset_s=i * 5.0, duration_s=10.0, start_utc=start)
        assert store.save(np.full((4, 8), i, dtype=np.float32), info, "mic") is not None
    assert store.compact_failed > 0 and store.saved == 130
    assert len([r for r in caplog.records if "cannot compact" in r.getMessage()]) == 1
    (d / "index.jsonl.tmp").rmdir()
    for i in range(130, 135):
        store.save(np.zeros((4, 8), dtype=np.float32),
                   WindowInfo(index=i, offset_s=i * 5.0, duration_s=10.0, start_utc=start), "mic")
    lines = (d / "index.jsonl").read_text().splitlines()
    kept = len(list(d.glob("*.npy")))
    assert kept <= len(lines) <= kept + 5  # compacted at the first deletion it could (130 lines before)


def test_a_state_directory_on_a_read_only_file_system_is_exit_77(tmp_path, tmpfs, daemons):
    fs = tmpfs("ro")
    tmpfs.remount(fs, "ro")
    d = daemons(_no_model_config(tmp_path, fs / "state"))
    assert d.wait(60) == 77, d.log
    assert _last_line(d) == (f"naturelm-edge: error: {tmp_path / 'daemon.yaml'}: state_dir: cannot create "
                             f"{fs / 'state'} (Read-only file system)")
