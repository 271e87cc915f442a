"""The watchdog is liveness, not a timer: a model that hangs on a window stops the pings while audio still flows,
and they resume when it completes. In process, with a stand-in pipeline that a test can hang (tests/fake_pipeline.py);
the end-to-end tests cover the microphone side with the real pipeline."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import soundfile as sf
import yaml
from fake_pipeline import FakePipeline

import edge.daemon
from edge.config import load_config
from edge.systemd_notify import Notifier


def test_hung_inference_withholds_the_watchdog(tmp_path, monkeypatch, caplog):
    sf.write(str(tmp_path / "a.wav"), 0.2 * np.ones(8000 * 3, dtype=np.float32), 8000)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump({
        "device_id": "rec-wd", "state_dir": str(tmp_path / "state"), "bundle": {"path": "bundle"},
        "source": {"type": "file", "file": {"path": "a.wav", "realtime": True, "loop": True}},
        "windowing": {"window_s": 0.5, "hop_s": 0.25},
        "prompts": [{"id": "p", "kind": "yes_no", "text": "Yes or no?"}],
        "mqtt": {"host": "127.0.0.1", "port": 9, "reconnect_min_delay_s": 5},  # no broker: not needed here
    }))
    pipeline = FakePipeline([], "rec-wd")
    monkeypatch.setattr(edge.daemon, "_open_pipeline",
                        lambda cfg: (pipeline.set_prompts(cfg.prompts), pipeline)[1])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.05)
    daemon = edge.daemon.Daemon(load_config(tmp_path / "daemon.yaml"),
                                Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "600000"}))
    caplog.set_level(logging.INFO)
    t = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    t.start()

    def collect(seconds: float) -> list[bytes]:
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                msg = sock.recv(4096)
            except TimeoutError:
                continue
            got.append(msg)
        return got

    try:
        assert any(m.startswith(b"READY=1") for m in collect(2.0))
        assert b"WATCHDOG=1" in collect(1.0)
        pipeline.running.clear()  # the model hangs on its next window; audio keeps coming
        collect(1.0)  # longer than the watchdog interval: the hang is noticed (pings sent before it are dropped)
        assert b"WATCHDOG=1" not in collect(1.5)
        assert any("withholding the systemd watchdog: inference has been on one window" in r.getMessage()
                   for r in caplog.records)
        pipeline.running.set()
        assert b"WATCHDOG=1" in collect(1.5)
    finally:
        pipeline.running.set()
        daemon.stop()
        t.join(30)
        sock.close()
    assert not t.is_alive()
    assert daemon.counters.processed >= 3
    assert daemon.scheduler.windows_dropped > 0  # while it hung, the backlog stayed bounded
