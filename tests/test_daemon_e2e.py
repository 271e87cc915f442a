"""The field daemon, black box: `python -m edge.cli run --config FILE` as a subprocess, with the real pipeline on the
tiny bundle, a real mosquitto, WAV fixtures, a stand-in microphone (tests/fake_sounddevice) and a NOTIFY_SOCKET
datagram socket in the place of systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import soundfile as sf
import yaml
from mqtt_broker import Subscriber

from edge.events import load_schema

ROOT = Path(__file__).resolve().parents[1]
FAKE_SD_DIR = Path(__file__).parent / "fake_sounddevice"
PROMPTS = [
    {"id": "crow", "kind": "yes_no", "text": "Is there a crow calling? Answer yes or no.", "threshold": 0.0},
    {"id": "species", "kind": "label", "text": "Which species is calling?", "labels": ["crow", "owl"]},
    {"id": "individuals", "kind": "count", "text": "How many individuals are calling?"},
]

@pytest.fixture(scope="module")
def daemon_bundle(tiny_full_bundle) -> Path:
    return tiny_full_bundle


def _wav(path: Path, seconds: float, silent_from: float | None = None, sr: int = 22050) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 2500 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    if silent_from is not None:
        x[int(silent_from * sr):] = 0.0
    sf.write(str(path), x, sr)
    return path


def _config(tmp_path: Path, bundle: Path, port: int, source: dict, **over) -> Path:
    cfg = {
        "device_id": "rec-e2e",
        "state_dir": str(tmp_path / "state"),
        "bundle": {"path": str(bundle), "provider": "cpu", "verify": "size"},
        "source": source,
        "windowing": {"window_s": 2.0, "hop_s": 1.0, "max_pending": 4},
        "prompts": PROMPTS,
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_delay_s": 0.1, "reconnect_max_delay_s": 0.5,
                 "keepalive_s": 10},
        "health": {"interval_s": 0.5},
        # Delivery and counts are under test here, not load shedding (tests/test_scheduler.py): on a busy shared
        # machine the tiny model can fall behind real time, and shed prompts would change the number of events.
        "scheduling": {"load": {"enabled": False}},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Daemon:
    """The daemon as a subprocess, its log (stderr) in a file."""

    def __init__(self, config: Path, env: dict | None = None, pythonpath: list[Path] = ()):
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            if env is None or k not in env:
                full_env.pop(k, None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=config.parent)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"daemon still running after {timeout} s; log:\n{self.log[-4000:]}") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _until(pred, timeout: float, what: str, daemon: Daemon | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}) while waiting for {what}:\n"
                                 f"{daemon.log[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"; log:\n{daemon.log[-4000:]}" if daemon else ""))


def _outbox(tmp_path: Path) -> list[int]:
    """The seqs waiting in the daemon's outbox (read from outside, as WAL allows)."""
    path = tmp_path / "state" / "outbox.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        return [r[0] for r in db.execute("SELECT seq FROM events ORDER BY seq")]


def _seqs(sub: Subscriber) -> list[int]:
    return sorted({e["seq"] for e in sub.events()})


def test_file_source_events_validate_status_and_health(daemon_bundle, mqtt_broker, daemons, tmp_path):
    wav = _wav(tmp_path / "dawn.wav", 6.0, silent_from=4.0)
    cfg = _config(tmp_path, daemon_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": False}},
                  windowing={"gate_dbfs": -60.0}, clips={"enabled": True}, embeddings={"enabled": True})
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg)
    assert d.wait(120) == 0, d.log
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["stopped"], what="stopped")

    # 6 s in 2 s windows every 1 s: 5 windows; the last (4-6 s) is silent and gated: 4 windows x 3 prompts.
    events = sub.events()
    schema = load_schema()
    for e in events:
        jsonschema.validate(e, schema)
    assert len(events) == 12
    assert _seqs(sub) == list(range(12))
    assert {e["prompt_id"] for e in events} == {"crow", "species", "individuals"}
    assert {e["window"]["index"] for e in events} == {0, 1, 2, 3}
    assert all(e["source"] == str(wav) and e["device_id"] == "rec-e2e" for e in events)
    assert all(e["model"]["encoder_provider"] == "cpu" for e in events)
    crow = [e for e in events if e["prompt_id"] == "crow"]
    assert all(e["positive"] and Path(e["clip"]).is_file() for e in crow)  # threshold 0: every window is positive
    assert len(list((tmp_path / "state" / "embeddings").glob("*.npy"))) == 4

    status = sub.on("/status")
    assert status[0] == "online" and status[-1] == "stopped" and "offline" not in status
    health = [json.loads(p) for p in sub.on("/health")]
    last = health[-1]
    assert last["windows_processed"] == 5 and last["windows_gated"] == 1 and last["windows_dropped"] == 0
    assert last["model"]["bundle_id"] and last["model"]["encoder_provider"] == "cpu"
    for key in ("uptime_s", "rtf", "overruns", "source_gaps", "outbox_depth", "outbox_dropped", "temperatures_c",
                "disk_free_bytes", "rss_bytes"):
        assert key in last
    assert "Traceback" not in d.log
    sub.close()


def test_broker_outage_loses_nothing(daemon_bundle, mqtt_broker, daemons, tmp_path):
    """The broker stops while windows keep completing, then comes back: every event arrives, seq without gaps."""
    wav = _wav(tmp_path / "a.wav", 6.0)
    cfg = _config(tmp_path, daemon_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": True}},
                  windowing={"window_s": 1.0, "hop_s": 0.5, "max_pending": 20})
    sub = Subscriber(mqtt_broker.port, ["naturelm/+/events"])
    d = daemons(cfg)
    _until(lambda: len(sub.events()) >= 3, 60, "the first events", d)
    mqtt_broker.stop()
    # Windows keep completing with nowhere to send them: the outbox fills.
    _until(lambda: len(_outbox(tmp_path)) >= 6, 30, "events queued in the outbox", d)
    mqtt_broker.start()
    assert d.wait(120) == 0, d.log
    # 6 s, 1 s windows every 0.5 s: 11 windows, 3 prompts each.
    sub.wait_for(lambda s: len(_seqs(s)) == 33, timeout=20, what="all 33 events")
    assert _seqs(sub) == list(range(33))
    assert "lost the connection to MQTT broker" in d.log
    assert _outbox(tmp_path) == []
    sub.close()


def test_sigkill_with_a_full_outbox_then_restart(daemon_bundle, mqtt_broker, daemons, tmp_path):
    """Killed with events still in the outbox: the broker publishes the last will, and after a restart the events
    arrive, with seq continuing where it stopped."""
    wav = _wav(tmp_path / "a.wav", 3.0)
    cfg = _config(tmp_path, daemon_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": True, "loop": True}},
                  windowing={"window_s": 1.0, "hop_s": 0.5}, mqtt={"max_inflight": 1})
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg)
    _until(lambda: len(sub.events()) >= 3, 60, "the first events", d)
    # The broker hangs (no acknowledgements); at most one event is in flight, the rest wait in the outbox.
    mqtt_broker.pause()
    _until(lambda: len(_outbox(tmp_path)) >= 6, 30, "events queued in the outbox", d)
    d.signal(signal.SIGKILL)
    d.proc.wait(10)
    waiting = _outbox(tmp_path)
    assert len(waiting) >= 6
    mqtt_broker.resume()
    sub.wait_for(lambda s: "offline" in s.on("/status"), timeout=15, what="the last will")

    d2 = daemons(cfg)
    _until(lambda: set(waiting) <= set(_seqs(sub)), 60, "the events left in the outbox", d2)
    _until(lambda: max(_seqs(sub)) > max(waiting) + 3, 60, "new events after the restart", d2)
    d2.signal(signal.SIGTERM)
    assert d2.wait(60) == 0, d2.log
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["stopped"], what="stopped")
    seqs = _seqs(sub)
    assert seqs == list(range(seqs[-1] + 1))  # nothing lost, the counter survived the kill
    assert sub.on("/status")[:3] == ["online", "offline", "online"]
    assert "events from before" in d2.log or "unsent event(s) from before" in d2.log
    sub.close()


class NotifySocket:
    """What systemd sees: the datagrams of $NOTIFY_SOCKET, timestamped on arrival by a reader thread."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, m in list(self.messages) if "WATCHDOG=1" in m.split("\n") and t >= since]

    def has(self, field: str) -> bool:
        return any(field in m.split("\n") for _, m in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def test_dead_microphone_keeps_the_watchdog_fed_reports_no_audio_reconnects_and_reports_the_gap(daemon_bundle,
                                                                                               mqtt_broker, daemons,
                                                                                               tmp_path):
    """The watchdog guards against hangs, not missing hardware: while the microphone is dead the pings go on, the
    status is `degraded` with `no_audio`, the source reopens the device by itself, and the gap is reported."""
    control = tmp_path / "sd"
    control.mkdir()
    notify = NotifySocket(tmp_path / "notify")
    cfg = _config(tmp_path, daemon_bundle, mqtt_broker.port,
                  {"type": "mic", "mic": {"device": "USB", "block_s": 0.05}, "stall_timeout_s": 0.5,
                   "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 0.5},
                  windowing={"window_s": 1.0, "hop_s": 1.0})
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", "FAKE_SD_CONTROL": str(control)},
                pythonpath=[FAKE_SD_DIR])
    _until(lambda: notify.has("READY=1"), 60, "READY=1", d)
    _until(lambda: len(notify.pings()) >= 3 and len(sub.events()) >= 3, 30, "watchdog pings and events", d)

    (control / "stall").touch()  # the microphone stops delivering frames
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["degraded"] and "no audio from mic:USB PnP Sound Device" in
                 json.loads(s.on("/degraded")[-1])["reasons"].get("no_audio", {}).get("reason", ""),
                 timeout=15, what="degraded: no_audio")
    stalled_at = time.monotonic()
    time.sleep(2.0)
    assert len(notify.pings(since=stalled_at)) >= 2  # fed all along: no restart for a missing device

    (control / "stall").unlink()  # the device works again, once reopened
    sub.wait_for(lambda s: "no_audio" not in json.loads(s.on("/degraded")[-1])["reasons"], timeout=15,
                 what="no_audio cleared")
    assert "microphone 'USB PnP Sound Device: Audio (hw:1,0)' reopened (reconnect 1)" in d.log

    def gap_reported(s):
        hs = [json.loads(p) for p in s.on("/health")]
        return any(h["source_gaps"] >= 1 and h["source_gap_s"] >= 2.0 and h["source"]["reconnects"] >= 1
                   and not h["source"]["stalled"] for h in hs)

    sub.wait_for(gap_reported, timeout=15, what="the gap in health")

    # SIGHUP: a new prompt list applies to the next windows, without reloading the bundle.
    text = cfg.read_text()
    cfg.write_text(text.replace("id: crow", "id: raven"))
    d.signal(signal.SIGHUP)
    sub.wait_for(lambda s: any(e["prompt_id"] == "raven" for e in s.events()), timeout=20, what="the reloaded prompt")
    assert d.log.count("model bundle") == 1 and "reloaded" in d.log

    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log
    assert notify.has("STOPPING=1")
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["stopped"], what="stopped")
    for e in sub.events():
        jsonschema.validate(e, load_schema())
    sub.close()
    notify.close()


def test_wrong_broker_password_is_reported_and_retried(daemon_bundle, mqtt_broker_factory, daemons, tmp_path):
    broker = mqtt_broker_factory(users={"rec": "right-password"})
    (tmp_path / "pw").write_text("wrong-password\n")
    wav = _wav(tmp_path / "a.wav", 3.0)
    cfg = _config(tmp_path, daemon_bundle, broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": True, "loop": True}},
                  mqtt={"username": "rec", "password_file": str(tmp_path / "pw")})
    d = daemons(cfg)
    _until(lambda: d.log.count("refused the connection: Not authorized") >= 3, 30, "repeated refusals", d)
    _until(lambda: len(_outbox(tmp_path)) >= 3, 30, "events kept in the outbox", d)
    assert d.proc.poll() is None  # still recording: no crash, no exit
    assert "connected to MQTT broker" not in d.log
    assert "wrong-password" not in d.log
    line = next(ln for ln in d.log.splitlines() if "refused the connection" in ln)
    assert " ERROR edge.mqtt: MQTT broker 127.0.0.1:" in line and "check mqtt.username and the password" in line
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log
    assert "Traceback" not in d.log
    assert len(_outbox(tmp_path)) >= 3  # kept for the next start


def test_bad_config_stops_before_anything_starts(tmp_path, daemons):
    (tmp_path / "bundle").mkdir()
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text("device_id: x\nbundle: {path: bundle}\nsource: {type: mic}\nprompts: []\nmqtt: {port: abc}\n")
    d = daemons(cfg)
    assert d.wait(30) == 2
    assert d.log.strip().splitlines()[-2:] == [  # every problem, one line each
        f"naturelm-edge: error: {cfg}: prompts: must be a non-empty list of prompts",
        f"naturelm-edge: error: {cfg}: mqtt.port: must be an integer 1..65535, got 'abc'"]


def test_a_backlog_goes_through_the_model_in_batches_with_the_same_answers(daemon_bundle, mqtt_broker, daemons,
                                                                            tmp_path):
    """A file read faster than the model (realtime: false) keeps windows waiting; with windowing.batch_max 4 the
    daemon takes them four at a time through the batched pipeline. Every window is answered once, as with
    batch_max 1: the same answers, bit for bit (exact batches: tests/test_batch.py)."""
    wav = _wav(tmp_path / "a.wav", 8.0)
    answers = {}
    for batch_max in (1, 4):
        run = tmp_path / f"b{batch_max}"
        run.mkdir()
        cfg = _config(run, daemon_bundle, mqtt_broker.port, {"type": "file", "file": {"path": str(wav),
                                                                                     "realtime": False}},
                      windowing={"max_pending": 8, "batch_max": batch_max}, device_id=f"rec-b{batch_max}")
        sub = Subscriber(mqtt_broker.port, [f"naturelm/rec-b{batch_max}/events"])
        d = daemons(cfg)
        assert d.wait(120) == 0, d.log
        # 8 s, 2 s windows every 1 s: 7 windows, 3 prompts each
        sub.wait_for(lambda s: len(_seqs(s)) == 21, timeout=20, what="all 21 events")
        assert _seqs(sub) == list(range(21))
        answers[batch_max] = {(e["window"]["index"], e["prompt_id"]): (e["answer"], e["score"]) for e in sub.events()}
        assert ("waiting windows in one batch" in d.log) == (batch_max > 1), d.log
        assert "Traceback" not in d.log
        sub.close()
    assert answers[4].keys() == answers[1].keys() and len(answers[1]) == 21
    assert answers[4] == answers[1]  # exact batches: bit for bit
