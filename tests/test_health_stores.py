"""Health readings (thermal zones, disk, memory, real-time factor) and the clip/embedding stores' retention."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import numpy as np
import soundfile as sf

from edge.config import StoreConfig
from edge.events import WindowInfo
from edge.health import WindowCounters, disk_free, rss_bytes
from edge.stores import ClipStore, EmbeddingStore


def test_temperatures_from_thermal_zones(tmp_path):
    for i, (kind, milli) in enumerate([("CPU-therm", "45500"), ("GPU-therm", "51000"), ("CPU-therm", "40000")]):
        z = tmp_path / f"thermal_zone{i}"
        z.mkdir()
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(milli + "\n")
    (tmp_path / "thermal_zone9").mkdir()  # a zone whose sensor refuses reads
    from edge.thermal import read_zone_temperatures

    assert read_zone_temperatures([str(tmp_path / "thermal_zone*")]) == {
        "CPU-therm": 45.5, "GPU-therm": 51.0, "CPU-therm.thermal_zone2": 40.0}


def test_disk_and_memory(tmp_path):
    assert disk_free(tmp_path) > 0
    assert disk_free(tmp_path / "missing") is None
    assert rss_bytes() > 10 * 2**20


def test_real_time_factor():
    c = WindowCounters(hop_s=5.0)
    assert c.take_rtf() is None
    for _ in range(2):
        c.started()
        c.busy_since -= 2.5  # as if each window took 2.5 s
        c.finished(ok=True, events=3)
    assert c.take_rtf() == 0.5 and c.processed == 2 and c.events == 6
    assert c.take_rtf() is None  # per report interval


def _info(i: int) -> WindowInfo:
    return WindowInfo(index=i, offset_s=i * 5.0, duration_s=1.0,
                      start_utc=datetime(2026, 6, 1, 4, 30, i, tzinfo=timezone.utc))


def test_clips_are_flac_and_bounded_by_size(tmp_path):
    sr = 16000
    one = 0.1 * np.random.default_rng(0).standard_normal(sr).astype(np.float32)
    probe = ClipStore(StoreConfig(enabled=True, dir=tmp_path / "probe"))
    size = probe.save(one, sr, _info(0)).stat().st_size
    store = ClipStore(StoreConfig(enabled=True, dir=tmp_path / "clips", max_bytes=int(size * 3.5)))
    paths = [store.save(one, sr, _info(i)) for i in range(6)]
    assert [p.exists() for p in paths] == [False, False, False, True, True, True]
    assert paths[3].name == "20260601T043003000Z_w00000003.flac"
    data, rate = sf.read(str(paths[5]))
    assert rate == sr and data.shape == (sr,) and np.allclose(data, one, atol=1e-4)
    assert store.bytes <= store.max_bytes and store.deleted == 3


def test_retention_by_age_includes_files_from_before_a_restart(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    old = d / "20250101T000000000Z_w00000000.flac"
    old.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    fresh = d / "20260101T000000000Z_w00000001.flac"
    fresh.write_bytes(b"x" * 10)
    store = ClipStore(StoreConfig(enabled=True, dir=d, max_age_days=30))
    assert not old.exists() and fresh.exists() and store.bytes == 10


def test_embeddings_with_an_index_that_follows_retention(tmp_path):
    store = EmbeddingStore(StoreConfig(enabled=True, dir=tmp_path / "emb", max_bytes=3 * (128 + 4 * 8 * 4)))
    for i in range(5):
        store.save(np.full((4, 8), i, dtype=np.float32), _info(i), "mic:USB")
    kept = sorted(p.name for p in (tmp_path / "emb").glob("*.npy"))
    assert len(kept) == 3
    assert np.load(tmp_path / "emb" / kept[-1])[0, 0] == 4.0
    lines = [json.loads(ln) for ln in (tmp_path / "emb" / "index.jsonl").read_text().splitlines()]
    assert lines[-1]["index"] == 4 and lines[-1]["source"] == "mic:USB" and lines[-1]["shape"] == [4, 8]
    # A restart compacts the index to the files that still exist.
    EmbeddingStore(StoreConfig(enabled=True, dir=tmp_path / "emb", max_bytes=10**6))
    lines = [json.loads(ln) for ln in (tmp_path / "emb" / "index.jsonl").read_text().splitlines()]
    assert sorted(ln["file"] for ln in lines) == kept
