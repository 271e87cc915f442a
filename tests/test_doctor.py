"""`naturelm-edge doctor`: every check named, PASS/WARN/FAIL/SKIP with a reason, exit 1 when one fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from edge import doctor

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["python", "board", "config", "onnxruntime", "llama.cpp", "sandbox", "microphone", "broker", "bundle",
          "encoder", "llm offload", "memory", "disk", "clock", "thermal"]


def _doctor(*args, env=None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge.cli", "doctor", *args], capture_output=True, text=True,
                          env=full, timeout=120, check=False)


def _config(tmp_path: Path, bundle: Path, port: int, **over) -> Path:
    zone = tmp_path / "zone"
    zone.mkdir(exist_ok=True)
    (zone / "temp").write_text("47500\n")
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    cfg = {"device_id": "rec-doc", "state_dir": str(tmp_path / "state"),
           "bundle": {"path": str(bundle), "provider": "cpu"},
           "source": {"type": "file", "file": {"path": "a.wav"}},
           "prompts": [{"id": "crow", "kind": "yes_no", "text": "Crow?"}],
           "mqtt": {"host": "127.0.0.1", "port": port},
           "scheduling": {"thermal": {"zones": str(zone / "temp")}}}
    cfg.update(over)
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lines(out: str) -> dict[str, tuple[str, str]]:
    got = {}
    for line in out.splitlines()[1:-1]:
        status, name, detail = line[:4].strip(), line[6:18].strip(), line[19:]
        got[name] = (status, detail)
    return got


def test_doctor_passes_with_a_good_config_bundle_and_broker(tiny_full_bundle, mqtt_broker, tmp_path):
    r = _doctor("--config", str(_config(tmp_path, tiny_full_bundle, mqtt_broker.port)))
    lines = _lines(r.stdout)
    assert list(lines) == CHECKS, r.stdout
    assert all(s in ("PASS", "WARN", "FAIL", "SKIP") and d for s, d in lines.values())
    assert lines["config"][0] == "PASS"
    assert lines["broker"][0] == "PASS" and f"mqtt://127.0.0.1:{mqtt_broker.port}: connected" in lines["broker"][1]
    assert lines["bundle"][0] == "PASS" and "sizes and sha256 match" in lines["bundle"][1]
    assert lines["memory"][0] == "PASS" and "the bundle needs" in lines["memory"][1]
    # The configured precision (fp32), measured on this machine against the bundle's reference.
    assert lines["encoder"][0] == "PASS" and lines["encoder"][1].startswith("fp32 on cpu: mean cosine 1.0000")
    # llama.cpp's own count (this CPU build offloads nothing; the tiny model has 2 layers + the output layer)
    assert "llama.cpp offloaded 0/3 layers to the GPU (n_gpu_layers all -> 0)" in lines["llm offload"][1]
    assert lines["thermal"] == ("PASS", "1 zone(s), hottest " + str(tmp_path / "zone" / "temp") +
                                " 47.5 C; shedding at 85 C")
    failed = [n for n, (s, _) in lines.items() if s == "FAIL"]
    assert r.returncode == (1 if failed else 0), r.stdout
    assert r.stdout.splitlines()[-1].endswith(f"{len(failed)} failed, 0 skipped")


def test_doctor_fails_on_a_broken_bundle_and_an_absent_broker(tiny_full_bundle, tmp_path):
    from mqtt_broker import free_port

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_full_bundle, bundle)
    gguf = next(bundle.glob("llm-*.gguf"))
    with open(gguf, "r+b") as f:  # same size, different bytes: only the sha256 can tell
        f.seek(1000)
        f.write(b"\xff" * 16)
    r = _doctor("--config", str(_config(tmp_path, bundle, free_port())), "--json")
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert r.returncode == 1 and not report["ok"]
    assert checks["bundle"]["status"] == "FAIL" and f"{gguf}: sha256" in checks["bundle"]["detail"]
    assert checks["broker"]["status"] == "FAIL" and "cannot connect" in checks["broker"]["detail"]
    assert checks["memory"]["status"] == "PASS"  # no bundle to compare with: only the machine's figures


def test_doctor_without_arguments_names_what_it_skips():
    r = _doctor()
    lines = _lines(r.stdout)
    assert list(lines) == CHECKS
    assert lines["config"] == ("SKIP", "no --config given")
    assert lines["broker"][0] == "SKIP" and lines["bundle"][0] == "SKIP"
    assert r.returncode == (1 if any(s == "FAIL" for s, _ in lines.values()) else 0)


def test_bad_config_is_a_failed_check(tmp_path):
    (tmp_path / "daemon.yaml").write_text("device_id: x\nmqtt: {port: abc}\n")
    r = _doctor("--config", str(tmp_path / "daemon.yaml"))
    lines = _lines(r.stdout)
    assert r.returncode == 1
    assert lines["config"][0] == "FAIL" and "daemon.yaml: bundle: missing (required section)" in lines["config"][1]


def test_clock_check():
    assert doctor.check_clock(datetime(2021, 5, 1, tzinfo=timezone.utc), lambda: ("yes", "t")).status == "FAIL"
    assert doctor.check_clock(datetime(2026, 5, 1, tzinfo=timezone.utc), lambda: ("yes", "t")).status == "PASS"
    c = doctor.check_clock(datetime(2026, 5, 1, tzinfo=timezone.utc), lambda: ("no", "timedatectl"))
    assert c.status == "WARN" and "NTP not synchronised" in c.detail
    c = doctor.check_clock(datetime(2026, 5, 1, tzinfo=timezone.utc), lambda: (None, "timedatectl not found"))
    assert c.status == "WARN" and "cannot tell" in c.detail


@pytest.mark.parametrize("stdout, rc, expected", [("yes\n", 0, "yes"), ("no\n", 0, "no"), ("", 1, None)])
def test_ntp_status_reads_timedatectl(monkeypatch, stdout, rc, expected):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: "/usr/bin/timedatectl")
    done = subprocess.CompletedProcess([], rc, stdout=stdout, stderr="Failed to connect to bus")
    assert doctor.ntp_status(run=lambda *a, **k: done)[0] == expected


def test_jetson_detection(monkeypatch, tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: x\n")
    real = Path.read_text

    def fake(self, *a, **k):
        if str(self) == "/etc/nv_tegra_release":
            return real(release, *a, **k)
        if str(self) == "/proc/device-tree/model":
            return "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00"
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake)
    info = doctor.jetson_info()
    assert info == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super, L4T R36.4.0"
    assert doctor.check_board(info).status == "PASS"
    # On a Jetson, a CPU-only onnxruntime is a failure, not a warning.
    c = doctor.check_providers(info, None)
    assert c.status in ("PASS", "FAIL")
    if "CUDA no" in c.detail and "TensorRT no" in c.detail:
        assert c.status == "FAIL" and "onnxruntime-gpu" in c.detail


def test_sandbox_check_compares_the_dropin_with_the_board(tmp_path):
    """On a Jetson (a fixture board), the unit's GPU drop-in must carry what the board's nodes need now."""
    import shutil as sh

    from edge.jetson_devices import build, render_dropin

    board = Path(__file__).parent / "fixtures" / "jetson" / "orin-nx-16gb-l4t-36.4.3"
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    root = tmp_path / "board"
    sh.copytree(board / "proc", root / "proc")
    from edge.jetson_devices import parse_listing

    for n in parse_listing((board / "dev.txt").read_text(), "dev.txt"):
        p = root / n.path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(p, 0o600 | 0o020000, os.makedev(n.major, n.minor))
    dropin = tmp_path / "50-gpu-devices.conf"
    info = "NVIDIA Jetson Orin NX, L4T R36.4.3"
    c = doctor.check_sandbox(info, dropin, root)
    assert c.status == "FAIL" and "is missing" in c.detail
    plan, _ = build(root)
    dropin.write_text(render_dropin(plan, "test"))
    c = doctor.check_sandbox(info, dropin, root)
    assert c.status == "PASS", c.detail
    dropin.write_text(render_dropin(plan, "test").replace("DeviceAllow=char-host1x-fence rw\n", ""))
    c = doctor.check_sandbox(info, dropin, root)
    assert c.status == "FAIL" and "lacks char-host1x-fence rw" in c.detail
    assert doctor.check_sandbox(None, dropin, root).status == "PASS"
    assert doctor.check_board("NVIDIA Jetson AGX Orin, L4T R36.3.0").status == "WARN"
    assert "JetPack 6.0" in doctor.check_board("NVIDIA Jetson AGX Orin, L4T R36.3.0").detail


def test_memory_counts_one_kv_stream_per_llm_sequence(tiny_full_bundle, tmp_path):
    """The LLM opens a KV stream of n_ctx cells per sequence: batch_max windows x (1 + the most beams a prompt
    uses). The memory bound counts them; a config whose batch would need more sequences than llama.cpp has is refused
    at its key."""
    from edge.bundle import load_bundle
    from edge.config import load_config
    from edge.errors import ConfigError

    caption = {"id": "cap", "kind": "caption", "text": "Caption the audio."}  # 2 beams, as upstream
    path = _config(tmp_path, tiny_full_bundle, 1883, windowing={"batch_max": 4},
                   prompts=[{"id": "crow", "kind": "yes_no", "text": "Crow?"}, caption])
    cfg = load_config(path)
    assert doctor.kv_sequences(cfg) == 4 * 3
    bundle = load_bundle(tiny_full_bundle)
    one, _ = doctor.model_memory(bundle, None, "fp32", 1)
    twelve, _ = doctor.model_memory(bundle, None, "fp32", 12)
    llm = bundle.manifest["llm"]
    assert twelve - one == 11 * llm["n_ctx"] * llm["n_layer"] * 2 * llm["n_embd"] * 2
    path = _config(tmp_path, tiny_full_bundle, 1883, windowing={"batch_max": 64},
                   prompts=[{**caption, "num_beams": 4}])
    with pytest.raises(ConfigError, match=r"windowing\.batch_max: 64 windows x \(1 \+ the prompts' beams\) = 320"):
        load_config(path)
