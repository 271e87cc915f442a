"""`naturelm-edge demo`: builds its tiny bundle once, runs the whole pipeline, publishes to a real broker."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
from mqtt_broker import Subscriber

from edge.events import load_schema


def _demo(*args):
    return subprocess.run([sys.executable, "-m", "edge.cli", "demo", "--no-progress", *args], capture_output=True,
                          text=True, timeout=600, check=False)


def test_demo_builds_once_runs_and_publishes(mqtt_broker, tmp_path):
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    try:
        first = _demo("--cache-dir", str(tmp_path), "--mqtt", f"127.0.0.1:{mqtt_broker.port}", "--seconds", "12")
        assert first.returncode == 0, first.stderr
        assert "building the tiny demo bundle" in first.stderr
        assert "RANDOM weights" in first.stderr and "naturelm-edge build --naturelm" in first.stderr
        # 12 s, window 10, hop 5: [0, 10) and the padded tail [5, 12); 4 prompts each
        assert "8 events from 2 windows" in first.stdout and "8/8 acknowledged by the broker" in first.stdout
        sub.wait_for(lambda s: len(s.events()) == 8, what="8 events")
        validator = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
        for e in sub.events():
            validator.validate(e)
        assert {e["prompt_id"] for e in sub.events()} == {"bird", "species", "count", "caption"}
        assert sorted(e["seq"] for e in sub.events()) == list(range(8))

        again = _demo("--cache-dir", str(tmp_path), "--no-mqtt", "--seconds", "5")
        assert again.returncode == 0, again.stderr
        assert "building the tiny demo bundle" not in again.stderr  # built once, reused
        assert "printing only" in again.stdout or "4 events from 1 windows" in again.stdout
    finally:
        sub.close()
