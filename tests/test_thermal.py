"""One reader of the thermal zones, with a timeout, off the inference thread, reading only the configured zones: on a
fixture sysfs tree where one zone's `temp` is a FIFO with no writer (its read blocks, as an Orin Nano's cv0..cv2 do
while those engines sleep)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import soundfile as sf
import yaml
from fake_pipeline import FakePipeline

import edge.daemon
from edge.config import load_config
from edge.thermal import ThermalReader, read_zones


def _tree(root):
    """thermal_zone0 cpu 45 C, thermal_zone1 cv0 (hangs), thermal_zone2 gpu 51 C; other_zone0 hangs, not configured."""
    for name, kind, milli in (("thermal_zone0", "cpu-thermal", "45000"), ("thermal_zone1", "cv0-thermal", None),
                              ("thermal_zone2", "gpu-thermal", "51000"), ("other_zone0", "cv1-thermal", None)):
        z = root / name
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        if milli is None:
            os.mkfifo(z / "temp")
        else:
            (z / "temp").write_text(milli + "\n")
    return str(root / "thermal_zone*")


def _release(fifo) -> None:
    """Give a blocked reader its value (open for writing completes its open), so no thread outlives the test."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # nobody is reading it
    os.write(fd, b"40000\n")
    os.close(fd)


def _readers(path) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"thermal-read {path}"]


def test_a_hung_zone_is_skipped_within_the_timeout_and_never_piles_up_threads(tmp_path):
    pattern = _tree(tmp_path / "sys")
    hung_zone = tmp_path / "sys" / "thermal_zone1" / "temp"
    try:
        t0 = time.monotonic()
        temps, hung = read_zones([pattern], timeout_s=0.3)
        assert time.monotonic() - t0 < 1.5
        assert temps == {"cpu-thermal": 45.0, "gpu-thermal": 51.0}
        assert hung == [str(hung_zone)]
        for _ in range(5):  # the stuck read is not started again
            temps, hung = read_zones([pattern], timeout_s=0.3)
            assert temps == {"cpu-thermal": 45.0, "gpu-thermal": 51.0} and hung == [str(hung_zone)]
        assert len(_readers(hung_zone)) == 1
        assert _readers(tmp_path / "sys" / "other_zone0" / "temp") == []  # not configured: never opened
    finally:
        _release(hung_zone)
    deadline = time.monotonic() + 5
    while _readers(hung_zone) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _readers(hung_zone) == []


def test_background_reader_caches_and_logs_a_hung_zone_once(tmp_path, caplog):
    pattern = _tree(tmp_path / "sys")
    hung_zone = tmp_path / "sys" / "thermal_zone1" / "temp"
    reader = ThermalReader([pattern], interval_s=0.05, timeout_s=0.2)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while reader.samples < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reader.samples >= 5
        t0 = time.monotonic()
        assert reader.temperatures() == {"cpu-thermal": 45.0, "gpu-thermal": 51.0}
        assert time.monotonic() - t0 < 0.05  # a cached value, never a wait
        assert reader.unresponsive() == [str(hung_zone)]
        warnings = [r for r in caplog.records if "did not answer" in r.getMessage()]
        assert len(warnings) == 1 and str(hung_zone) in warnings[0].getMessage()
    finally:
        reader.stop()
        _release(hung_zone)


def test_daemon_health_and_scheduler_share_one_reader_and_inference_never_waits(tmp_path, monkeypatch):
    pattern = _tree(tmp_path / "sys")
    hung_zone = tmp_path / "sys" / "thermal_zone1" / "temp"
    sf.write(str(tmp_path / "a.wav"), 0.2 * np.ones(8000 * 3, dtype=np.float32), 8000)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump({
        "device_id": "rec-th", "state_dir": str(tmp_path / "state"), "bundle": {"path": "bundle"},
        "source": {"type": "file", "file": {"path": "a.wav", "realtime": True, "loop": True}},
        "windowing": {"window_s": 0.5, "hop_s": 0.25},
        "prompts": [{"id": "p", "kind": "yes_no", "text": "Yes or no?"}],
        "mqtt": {"host": "127.0.0.1", "port": 9, "reconnect_min_delay_s": 5},
        "scheduling": {"thermal": {"zones": [pattern], "interval_s": 0.1}},
    }))
    pipeline = FakePipeline([], "rec-th")
    monkeypatch.setattr(edge.daemon, "_open_pipeline", lambda cfg: (pipeline.set_prompts(cfg.prompts), pipeline)[1])
    daemon = edge.daemon.Daemon(load_config(tmp_path / "daemon.yaml"))
    t = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    t.start()
    try:
        deadline = time.monotonic() + 20
        while daemon.counters.processed < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.counters.processed >= 6  # windows go on with a hung zone configured
        h = daemon.health()
        assert h["temperatures_c"] == {"cpu-thermal": 45.0, "gpu-thermal": 51.0}
        assert h["temperature_max_c"] == 51.0 == h["scheduling"]["temperature_c"]
        assert h["thermal_zones_unresponsive"] == [str(hung_zone)]
        assert len(_readers(hung_zone)) == 1
        assert [th for th in threading.enumerate() if th.name.startswith("thermal-read /sys/")] == []
    finally:
        daemon.stop()
        t.join(30)
        _release(hung_zone)
    assert not t.is_alive()
