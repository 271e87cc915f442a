"""Soak: the field daemon over a simulated day of audio, watched for leaks.

Runs `naturelm-edge run` as a subprocess, exactly as systemd would (minus systemd), on the tiny bundle (built once into
a cache directory with export.tiny_model + export.onnx_export.export_bundle + quantize.build.build_llm_bundle), with a
looped recording as its source read as fast as the model goes (`file.realtime: false`: the windows, timestamps,
outbox, clips and embeddings are those of a recorder, the clock is not), against a real mosquitto, with a subscriber
that receives every event. The recording has quiet stretches that the activity gate skips (cheaply, as in a real
night), but most windows run the whole model: front end, ONNX encoder, llama.cpp prefix and five prompts (a privacy
prompt, a detection that always fires so that clips are written and rotated, a label, a count, and a caption every
sixth window). Clips and embeddings are on, with retention limits small enough to be hit many times over.

Every --interval seconds it samples the daemon's resident memory (RSS), open file descriptors, threads (psutil, on
the daemon's pid), and the outbox (its SQLite files' bytes on disk, and `outbox_depth` from the latest health
message), against the simulated time (windows processed x hop, from the latest health message). At the end it
fits a least-squares line to each against simulated hours, over the whole run and over its second half (after the
allocators and caches settled), and writes benchmarks/results/soak.json.

    PYTHONPATH=. python benchmarks/soak.py                  # 24 simulated hours (the default)
    PYTHONPATH=. python benchmarks/soak.py --rate 60        # only measure: 60 s of wall time, the projected wall time
    PYTHONPATH=. python benchmarks/soak.py --hours 8 --interval 5 --work /tmp/soak

Not part of the test run (pytest collects tests/ only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test suite's mosquitto helper
RESULTS = REPO / "benchmarks" / "results" / "soak.json"
DEVICE_ID = "soak-01"
WINDOW_S = 10.0
HOP_S = 5.0  # the documented default windowing: 10 s windows every 5 s
RECORDING_S = 300.0  # looped; the last QUIET_S of it are near silence, which the gate skips
QUIET_S = 45.0
GATE_DBFS = -45.0
PROMPTS = [
    # The tiny model's random weights give P(Yes) ~0.71-0.76 on this recording: about half the windows are "private".
    {"id": "speech", "kind": "yes_no", "text": "Is there human speech in this recording? Answer yes or no.",
     "threshold": 0.73},
    {"id": "bird", "kind": "yes_no", "text": "Is there a bird calling in this recording? Answer yes or no.",
     "threshold": 0.0},  # always positive: a clip for every window the privacy prompt lets through
    {"id": "species", "kind": "label", "text": "Which of these is calling?", "labels": ["crow", "owl", "wren"]},
    {"id": "individuals", "kind": "count", "text": "How many individuals are calling?"},
    {"id": "caption", "kind": "caption", "text": "Caption the audio.", "every_n_windows": 6, "max_tokens": 12},
]


def log(msg: str) -> None:
    print(f"[soak] {msg}", flush=True)


# --- set-up ---------------------------------------------------------------------------------------------------------


def build_bundle(work: Path) -> Path:
    """The tiny model's complete bundle (audio encoder + Q4_K_M LLM), as tests/conftest.py's tiny_full_bundle."""
    from edge.bundle import update_manifest

    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file() and (work / "bundle.complete").is_file():
        return bundle
    from export.onnx_export import export_bundle
    from export.tiny_model import build_tiny_model
    from quantize.build import build_llm_bundle

    log(f"building the tiny bundle into {bundle}")
    shutil.rmtree(work / "model", ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    naturelm_dir, llama_dir = build_tiny_model(work / "model", preset="tiny", seed=0)
    export_bundle(naturelm_dir, bundle, precisions=("fp32",), progress=False)
    llm_dir = work / "llm"
    shutil.rmtree(llm_dir, ignore_errors=True)
    build_llm_bundle(naturelm_dir, llama_dir, llm_dir, types=("Q4_K_M",), lora_mode="merge", merging_alpha=1.0,
                     quality=False, threads=1, progress=False)
    llm = json.loads((llm_dir / "manifest.json").read_text())
    files = sorted(llm["files"])
    for name in files:
        shutil.copy2(llm_dir / name, bundle / name)
    update_manifest(bundle, "llm", llm["llm"], files=files, tools=llm.get("tools"), source=llm.get("source"))
    (work / "bundle.complete").touch()
    return bundle


def write_recording(path: Path) -> Path:
    import soundfile as sf

    from edge.synth import birdsong

    sr = 16000
    x = birdsong(RECORDING_S, sr, seed=1)
    quiet = int((RECORDING_S - QUIET_S) * sr)
    x[quiet:] = (1e-4 * np.random.default_rng(2).standard_normal(x.size - quiet)).astype(np.float32)  # -80 dBFS
    sf.write(str(path), x, sr)
    return path


def write_config(work: Path, bundle: Path, wav: Path, port: int) -> Path:
    import yaml

    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    cfg = {
        "device_id": DEVICE_ID,
        "state_dir": str(state),
        # One llama.cpp thread, as the tests run the tiny model: its ops take microseconds, and two threads on two
        # busy cores spend more time in the per-op barrier than in the op (10-100x slower windows, measured).
        "bundle": {"path": str(bundle), "provider": "cpu", "verify": "full", "llm_threads": 1},
        "source": {"type": "file", "file": {"path": str(wav), "realtime": False, "loop": True}},
        "windowing": {"window_s": WINDOW_S, "hop_s": HOP_S, "gate_dbfs": GATE_DBFS, "max_pending": 4},
        "prompts": PROMPTS,
        "privacy": {"prompt_id": "speech", "withhold_events": True},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 2.0},
        "health": {"interval_s": 2.0},
        "clips": {"enabled": True, "max_bytes": "64MiB", "max_age_days": 30},
        "embeddings": {"enabled": True, "max_bytes": "4MiB", "max_age_days": 30},
        "watchdog": {"enabled": False},
    }
    path = work / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def daemon_command() -> list[str]:
    exe = Path(sys.executable).with_name("naturelm-edge")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edge.cli"]


# --- measuring ------------------------------------------------------------------------------------------------------


class Listener:
    """Every event and health message from the broker, counted as they come (not kept: a day is ~40k events)."""

    def __init__(self, port: int):
        import paho.mqtt.client as paho

        self.lock = threading.Lock()
        self.seqs: set[int] = set()
        self.events = 0
        self.duplicates = 0
        self.by_prompt: dict[str, int] = {}
        self.health: dict | None = None
        self.health_messages = 0
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="soak-listener", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"naturelm/{DEVICE_ID}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/events"):
            e = json.loads(msg.payload)
            with self.lock:
                if e["seq"] in self.seqs:
                    self.duplicates += 1  # QoS 1 allows a redelivery; it must not be a new seq
                self.seqs.add(e["seq"])
                self.events += 1
                self.by_prompt[e["prompt_id"]] = self.by_prompt.get(e["prompt_id"], 0) + 1
        elif msg.topic.endswith("/health"):
            with self.lock:
                self.health = json.loads(msg.payload)
                self.health_messages += 1

    def latest_health(self) -> dict | None:
        with self.lock:
            return None if self.health is None else dict(self.health)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def outbox_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("outbox.sqlite3*") if p.is_file())


def outbox_rows(state: Path) -> int | None:
    path = state / "outbox.sqlite3"
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
            return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return None


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = a + b x: the slope b (per simulated hour) and how well it fits."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.size < 3 or np.ptp(x) == 0:
        return {"slope_per_sim_hour": None, "points": int(x.size)}
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss = float(((y - y.mean()) ** 2).sum())
    return {"slope_per_sim_hour": float(b), "intercept": float(a), "r2": float(1 - (resid**2).sum() / ss) if ss else
            None, "points": int(x.size), "first": float(y[0]), "last": float(y[-1]), "min": float(y.min()),
            "max": float(y.max())}


# --- the run --------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    import psutil
    from mqtt_broker import Broker, have_mosquitto

    if not have_mosquitto():
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(work)
    wav = write_recording(work / "recording.wav")
    broker = Broker(work / "broker").start()
    listener = Listener(broker.port)
    config = write_config(work, bundle, wav, broker.port)
    state = work / "state"
    log_path = work / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
        env.pop(k, None)
    target_s = args.hours * 3600.0
    samples: list[dict] = []
    t_start = time.monotonic()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([*daemon_command(), "run", "--config", str(config)], stdout=logf,
                                stderr=subprocess.STDOUT, env=env, cwd=work)
    p = psutil.Process(proc.pid)
    log(f"daemon pid {proc.pid}; log {log_path}")
    t_model = None
    try:
        while True:
            time.sleep(args.interval)
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}; see {log_path}")
            h = listener.latest_health()
            if h is None:
                continue
            if t_model is None:
                t_model = time.monotonic()
            sim_s = (h["windows_processed"] + h["windows_failed"] + h["windows_dropped"]) * HOP_S
            with p.oneshot():
                mem = p.memory_info()
                sample = {"wall_s": round(time.monotonic() - t_start, 2), "sim_hours": sim_s / 3600.0,
                          "rss_bytes": mem.rss, "fds": p.num_fds(), "threads": p.num_threads(),
                          "outbox_file_bytes": outbox_bytes(state), "outbox_depth": h["outbox_depth"],
                          "cpu_s": sum(p.cpu_times()[:2])}
            samples.append(sample)
            if len(samples) % 10 == 1:
                log(f"{sample['wall_s']:.0f} s wall, {sample['sim_hours']:.2f} simulated h: rss "
                    f"{sample['rss_bytes'] / 2**20:.1f} MiB, fds {sample['fds']}, threads {sample['threads']}, "
                    f"outbox {sample['outbox_depth']} ({sample['outbox_file_bytes'] / 1024:.0f} KiB)")
            if args.rate and time.monotonic() - t_start >= args.rate:
                break
            if sim_s >= target_s:
                break
        wall = time.monotonic() - t_start
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(1.0)  # the last health report and events in flight
    final = listener.latest_health() or {}
    listener.close()
    broker.stop()
    log_text = log_path.read_text(errors="replace")

    sim_hours = samples[-1]["sim_hours"] if samples else 0.0
    model_wall = wall - ((t_model or t_start) - t_start)
    out: dict = {
        "what": "naturelm-edge run (subprocess) on the tiny bundle (fp32 encoder, Q4_K_M LLM), file source looped "
                "as fast as the model goes, real mosquitto, clips and embeddings on with retention",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "config": {"window_s": WINDOW_S, "hop_s": HOP_S, "gate_dbfs": GATE_DBFS, "recording_s": RECORDING_S,
                   "quiet_s_per_loop": QUIET_S, "prompts": [p["id"] for p in PROMPTS],
                   "privacy": "speech (withhold_events)", "clips_max_bytes": "64MiB", "embeddings_max_bytes": "4MiB",
                   "sample_interval_s": args.interval},
        "simulated_hours": round(sim_hours, 3),
        "target_hours": args.hours,
        "wall_s": round(wall, 1),
        "simulated_hours_per_wall_minute": round(sim_hours / (model_wall / 60), 3) if model_wall > 0 else None,
        "daemon_exit_code": rc,
        "final_health": {k: final.get(k) for k in (
            "windows_processed", "windows_gated", "windows_failed", "windows_dropped", "events", "events_published",
            "outbox_depth", "outbox_dropped", "clips_saved", "embeddings_saved", "rss_bytes", "privacy", "scheduling",
            "mqtt")},
        "delivery": {"events_received": listener.events, "distinct_seqs": len(listener.seqs),
                     "duplicates": listener.duplicates,
                     "seq_gaps": (max(listener.seqs) + 1 - len(listener.seqs)) if listener.seqs else None,
                     "by_prompt": listener.by_prompt, "outbox_rows_left": outbox_rows(state)},
        "log": {"tracebacks": log_text.count("Traceback"), "errors": log_text.count(" ERROR "),
                "warnings": log_text.count(" WARNING ")},
        "samples": samples,
    }
    if samples:
        half = [s for s in samples if s["sim_hours"] >= sim_hours / 2]
        out["slopes"] = {}
        for key, unit in (("rss_bytes", "bytes"), ("fds", "descriptors"), ("threads", "threads"),
                          ("outbox_file_bytes", "bytes"), ("outbox_depth", "events")):
            xs = [s["sim_hours"] for s in samples]
            out["slopes"][key] = {"unit": f"{unit} per simulated hour", "whole_run": fit(xs, [s[key] for s in samples]),
                                  "second_half": fit([s["sim_hours"] for s in half], [s[key] for s in half])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=24.0, help="simulated hours of audio (default 24)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--rate", type=float, default=0.0, metavar="SECONDS",
                    help="only measure the rate: run this many seconds of wall time, print the projected wall time "
                         "for --hours, and write nothing")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "naturelm-edge" / "soak"),
                    help="cache for the bundle, the recording and the run's state")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out = run(args)
    rate = out["simulated_hours_per_wall_minute"]
    if args.rate:
        log(f"{out['simulated_hours']:.3f} simulated h in {out['wall_s']:.0f} s: {rate} simulated h per wall minute; "
            f"{args.hours:g} h would take ~{args.hours / rate:.1f} min" if rate else "no rate measured")
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    log(f"{out['simulated_hours']:.2f} simulated hours in {out['wall_s'] / 60:.1f} min; wrote {args.out}")
    for key, s in out.get("slopes", {}).items():
        w, h2 = s["whole_run"]["slope_per_sim_hour"], s["second_half"]["slope_per_sim_hour"]
        log(f"  {key}: {w:+.4g} (whole run), {h2:+.4g} (second half) {s['unit']}" if w is not None else f"  {key}: -")
    d = out["delivery"]
    log(f"  events received {d['events_received']} (distinct seqs {d['distinct_seqs']}, gaps {d['seq_gaps']}), "
        f"outbox rows left {d['outbox_rows_left']}, daemon exit {out['daemon_exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
