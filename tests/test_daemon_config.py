"""The daemon's configuration: the example validates; each kind of mistake is one line naming the file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.config import Secret, load_config, read_mqtt_password, restart_needed
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "daemon.yaml"


def _write(tmp_path: Path, data: dict | str, name: str = "daemon.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture
def base(tmp_path) -> dict:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "a.wav").write_bytes(b"")
    return {
        "device_id": "rec-1",
        "state_dir": str(tmp_path / "state"),
        "bundle": {"path": "bundle"},
        "source": {"type": "file", "file": {"path": "a.wav"}},
        "prompts": [{"id": "crow", "kind": "yes_no", "text": "Is there a crow? Answer yes or no."}],
        "mqtt": {"host": "127.0.0.1"},
    }


def _error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, data))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(tmp_path / "daemon.yaml") + ": "), msg
    return msg


def test_example_config_validates(tmp_path):
    """examples/daemon.yaml as shipped, with its two machine-specific paths pointed at files that exist here."""
    (tmp_path / "bundle").mkdir()
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    text = EXAMPLE.read_text()
    for path, replacement in (("/opt/naturelm-edge/bundle", tmp_path / "bundle"),
                              ("/etc/naturelm-edge/ca.crt", tmp_path / "ca.crt")):
        assert path in text
        text = text.replace(path, str(replacement))
    cfg = load_config(_write(tmp_path, text))
    assert cfg.device_id == "recorder-01"
    assert cfg.source.type == "mic" and cfg.source.mic.device == "USB"
    assert [p.id for p in cfg.prompts] == ["crow", "species", "owl", "speech", "caption"]
    assert cfg.prompts[2].active_hours == ((20 * 60, 6 * 60),)
    assert cfg.privacy.prompt_id == "speech" and cfg.privacy.withhold_events
    assert cfg.scheduling.thermal.shed_above_c == 85 and cfg.scheduling.load.shed_pending == 3
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls.ca == tmp_path / "ca.crt"
    assert cfg.mqtt.password_credential == "mqtt-password"
    assert cfg.outbox.max_bytes == 64 * 2**20 and cfg.outbox.path == tmp_path / "outbox.sqlite3"
    assert cfg.clips.max_bytes == 2**30 and cfg.embeddings.max_bytes == 2 * 2**30
    assert cfg.windowing.gate_dbfs == -70
    assert (cfg.site.latitude, cfg.site.longitude) == (60.1699, 24.9384)
    assert cfg.detections.quiet_s == 30 and cfg.detections.notify_for("crow").cooldown_s == 600
    assert cfg.detections.notify_for("species").first_of_day and not cfg.detections.notify_for("owl").first_of_day
    assert cfg.detections.birdnet.prompts == ("species",) and not cfg.detections.birdnet.enabled
    assert not cfg.remote_control.enabled and cfg.remote_control.allow == ("health",)
    assert not cfg.clip_server.enabled and cfg.clip_server.bind == "127.0.0.1" and cfg.metrics.port == 9108


def test_every_key_of_the_example_is_documented():
    """Each key line of the example has a comment just above it, or on its line, or belongs to a documented group."""
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        if line.startswith("      ") or stripped.endswith(":"):  # inside a prompt, or a section header
            continue
        prev = lines[i - 1].strip()
        documented = prev.startswith("#") or "#" in line or (prev and not prev.startswith("#") and ":" in prev)
        assert documented, f"examples/daemon.yaml line {i + 1} has no comment: {line}"


def test_defaults_and_relative_paths(tmp_path, base):
    cfg = load_config(_write(tmp_path, base))
    assert cfg.bundle.path == tmp_path / "bundle"
    assert cfg.source.file.path == tmp_path / "a.wav" and cfg.source.file.realtime is True
    assert (cfg.windowing.window_s, cfg.windowing.hop_s, cfg.windowing.max_pending) == (10.0, 5.0, 4)
    assert cfg.mqtt.port == 1883 and cfg.mqtt.prefix == "naturelm" and cfg.mqtt.tls is None
    assert cfg.outbox.path == tmp_path / "state" / "outbox.sqlite3"
    assert cfg.clips.enabled is False and cfg.clips.dir == tmp_path / "state" / "clips"
    assert cfg.health.interval_s == 60.0 and cfg.watchdog.enabled


def test_state_dir_from_systemd(tmp_path, base):
    del base["state_dir"]
    cfg = load_config(_write(tmp_path, base), env={"STATE_DIRECTORY": str(tmp_path / "sd")})
    assert cfg.state_dir == tmp_path / "sd"


@pytest.mark.parametrize("change, key, words", [
    (lambda d: d["mqtt"].update(port="abc"), "mqtt.port", "must be an integer 1..65535, got 'abc'"),
    (lambda d: d["mqtt"].update(port=70000), "mqtt.port", "1..65535"),
    (lambda d: d["mqtt"].update(prot=1883), "mqtt.prot", "unknown key (did you mean 'port'?)"),
    (lambda d: d.update(mqt=d.pop("mqtt")), "mqtt", "missing (required section); is 'mqt' a misspelling of it?"),
    (lambda d: d.update(extra=1), "extra", "unknown key"),
    (lambda d: d.pop("device_id"), "device_id", "missing"),
    (lambda d: d.update(device_id="a/b"), "device_id", "MQTT topics"),
    (lambda d: d.pop("mqtt"), "mqtt", "missing"),
    (lambda d: d["bundle"].update(path="nope"), "bundle.path", "directory not found"),
    (lambda d: d["bundle"].update(provider="tpu"), "bundle.provider", "auto, tensorrt, cuda, cpu"),
    (lambda d: d["bundle"].update(n_gpu_layers=1.5), "bundle.n_gpu_layers", "integer"),
    (lambda d: d["source"].update(type="radio"), "source.type", "mic, file, stdin"),
    (lambda d: d["source"]["file"].update(path="missing.wav"), "source.file.path", "file not found"),
    (lambda d: d["source"]["file"].update(realtime="yes please"), "source.file.realtime", "true or false"),
    (lambda d: d["source"].update(type="stdin"), "source.stdin", "missing"),
    (lambda d: d["source"].update(mic={"device": True}), "source.mic.device", "name"),
    (lambda d: d.update(windowing={"window_s": 5, "hop_s": 10}), "windowing.hop_s", "<= window_s"),
    (lambda d: d.update(windowing={"window_s": -1}), "windowing.window_s", "> 0"),
    (lambda d: d.update(windowing={"batch_max": 0}), "windowing.batch_max", "integer 1..64"),
    (lambda d: d.update(prompts=[{"id": "x", "kind": "guess", "text": "?"}]), "prompts[0].kind", "yes_no"),
    (lambda d: d.update(prompts="missing.yaml"), "prompts", "not found"),
    (lambda d: d.update(prompts=3), "prompts", "path to a prompts file or a list"),
    (lambda d: d["mqtt"].update(username="u", password_file="nofile"), "mqtt.password_file", "file not found"),
    (lambda d: d["mqtt"].update(password_credential="pw"), "mqtt.username", "needs a user name"),
    (lambda d: d["mqtt"].update(tls={"ca": "nope.crt"}), "mqtt.tls.ca", "file not found"),
    (lambda d: d["mqtt"].update(reconnect_min_delay_s=10, reconnect_max_delay_s=1), "mqtt.reconnect_max_delay_s",
     ">= reconnect_min_delay_s"),
    (lambda d: d.update(outbox={"max_bytes": "lots"}), "outbox.max_bytes", "size in bytes"),
    (lambda d: d.update(clips={"enabled": True, "max_age_days": 0}), "clips.max_age_days", "> 0"),
    (lambda d: d.update(health={"interval_s": "often"}), "health.interval_s", "number"),
    (lambda d: d.update(watchdog={"enabled": 1}), "watchdog.enabled", "true or false"),
    (lambda d: d.update(mqtt=[1, 2]), "mqtt", "must be a mapping"),
    (lambda d: d.update(site={"latitude": 91, "longitude": 0}), "site.latitude", "-90..90"),
    (lambda d: d.update(site={"latitude": 60}), "site.longitude", "both latitude and longitude"),
    (lambda d: d.update(detections={"quiet_s": -1}), "detections.quiet_s", "number 0..86400"),
    (lambda d: d.update(detections={"prompts": {"nope": {}}}), "detections.prompts.nope", "names no prompt"),
    (lambda d: d.update(detections={"prompts": {"crow": {"cooldown": 5}}}), "detections.prompts.crow.cooldown",
     "did you mean 'cooldown_s'?"),
    (lambda d: d.update(detections={"birdnet": {"prompts": ["crow"]}}), "detections.birdnet.prompts",
     "must name a label prompt"),
    (lambda d: d.update(detections={"birdnet": {"topic": "a/#"}}), "detections.birdnet.topic", "no wildcards"),
    (lambda d: d.update(remote_control={"allow": ["reboot"]}), "remote_control.allow", "[0] must be one of health"),
    (lambda d: d.update(remote_control={"prompts": ["zz"]}), "remote_control.prompts", "names no prompt"),
    (lambda d: d.update(remote_control={"threshold_min": 0.9, "threshold_max": 0.1}),
     "remote_control.threshold_max", ">= threshold_min"),
    (lambda d: d.update(clip_server={"enabled": True}), "clip_server", "needs clips.enabled"),
    (lambda d: d.update(clip_server={"port": 0}), "clip_server.port", "1..65535"),
    (lambda d: d.update(clip_server={"public_url": "ftp://x"}), "clip_server.public_url", "http://"),
    (lambda d: d.update(metrics={"bind": "a b"}), "metrics.bind", "address"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, base, change, key, words):
    change(base)
    msg = _error(tmp_path, base)
    assert f": {key}: " in msg, msg
    assert words in msg, msg


def test_yaml_syntax_and_duplicate_keys(tmp_path, base):
    msg = _error(tmp_path, "device_id: [unclosed\n")
    assert "not valid YAML: line" in msg
    text = yaml.safe_dump(base, sort_keys=False) + "device_id: again\n"
    assert "duplicate key 'device_id'" in _error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml: config file not found"):
        load_config(tmp_path / "nothere.yaml")


def test_prompts_file_errors_name_that_file(tmp_path, base):
    (tmp_path / "prompts.yaml").write_text("prompts:\n  - {id: a, kind: yes_no}\n")
    base["prompts"] = "prompts.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, base))
    assert str(e.value) == f"{tmp_path / 'prompts.yaml'}: prompts[0].text: missing"


def test_password_is_never_shown(tmp_path, base):
    (tmp_path / "pw").write_text("s3cret-Pa55\n")
    base["mqtt"].update(username="rec", password_file="pw")
    cfg = load_config(_write(tmp_path, base))
    secret = read_mqtt_password(cfg.mqtt, "daemon.yaml")
    assert secret.reveal() == "s3cret-Pa55"  # the trailing newline an editor adds is not part of it
    for text in (repr(secret), str(secret), repr(cfg), cfg.summary(), repr(cfg.mqtt)):
        assert "s3cret" not in text


def test_password_from_systemd_credential(tmp_path, base):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential")
    base["mqtt"].update(username="rec", password_credential="mqtt-password")
    cfg = load_config(_write(tmp_path, base))
    assert read_mqtt_password(cfg.mqtt, "d.yaml", env={"CREDENTIALS_DIRECTORY": str(creds)}).reveal() == \
        "from-credential"
    with pytest.raises(ConfigError, match=r"mqtt.password_credential: \$CREDENTIALS_DIRECTORY is not set"):
        read_mqtt_password(cfg.mqtt, "d.yaml", env={})
    assert isinstance(read_mqtt_password(cfg.mqtt, "d.yaml", env={"CREDENTIALS_DIRECTORY": str(creds)}), Secret)


def test_restart_needed_lists_what_sighup_cannot_apply(tmp_path, base):
    old = load_config(_write(tmp_path, base))
    base["prompts"][0]["threshold"] = 0.9
    base["windowing"] = {"gate_dbfs": -50}
    base["mqtt"]["port"] = 1884
    new = load_config(_write(tmp_path, base))
    assert restart_needed(old, new) == ["mqtt"]


def _cli(*args, env=None):
    import os

    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("CREDENTIALS_DIRECTORY", None)
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], check=False, capture_output=True, text=True, cwd=ROOT,
                          env={**full_env, **(env or {})}, timeout=60)


def test_check_config_cli(tmp_path, base):
    import json

    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps({
        "format": "naturelm-edge-bundle", "format_version": 1, "files": {"x.bin": {"sha256": "0" * 64, "size": 3}}}))
    (tmp_path / "bundle" / "x.bin").write_bytes(b"abc")
    import numpy as np
    import soundfile as sf

    sf.write(str(tmp_path / "a.wav"), np.zeros(800, dtype=np.float32), 8000)
    good = _write(tmp_path, base)
    r = _cli("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{good}: OK") and "1 prompt(s): crow" in r.stdout

    base["mqtt"]["port"] = "abc"
    r = _cli("check-config", str(_write(tmp_path, base)))
    assert r.returncode == 2
    assert r.stderr.strip() == f"naturelm-edge: error: {good}: mqtt.port: must be an integer 1..65535, got 'abc'"

    # A file source that is not audio is refused here, not retried forever by the daemon.
    base["mqtt"]["port"] = 1883
    (tmp_path / "a.wav").write_text("not audio\n")
    r = _cli("check-config", str(_write(tmp_path, base)))
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"naturelm-edge: error: {good}: source.file.path: {tmp_path / 'a.wav'}: not a "
                                       "readable audio file ("), r.stderr


def test_every_problem_is_reported_one_line_each_even_with_paths_missing_here(tmp_path, base):
    """Structural errors (unknown keys, wrong types) are reported together with paths that do not exist on this
    machine, and every bad prompt: not only the first problem."""
    base["bundle"] = {"path": "/opt/not-on-this-machine/bundle", "provider": "gpu"}
    base["source"] = {"type": "file", "file": {"path": "/mnt/card/not-here.wav", "realtim": True}}
    base["windowing"] = {"window_s": 2, "hop_s": -1}
    base["mqtt"] = {"host": "127.0.0.1", "port": "abc"}
    base["prompts"] = [{"id": "ok", "kind": "yes_no", "text": "Yes?"}, {"id": "bad", "kind": "nope", "text": "x"},
                       {"id": "lab", "kind": "label", "text": "Which?", "labels": ["one"]}]
    base["colour"] = "green"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, base))
    f = tmp_path / "daemon.yaml"
    lines = str(e.value).splitlines()
    assert lines[-1].startswith(f"{f}: colour: unknown key (known here: bundle, ")
    assert lines[:-1] == [
        f"{f}: bundle.path: directory not found: /opt/not-on-this-machine/bundle",
        f"{f}: bundle.provider: must be one of auto, tensorrt, cuda, cpu, got 'gpu'",
        f"{f}: source.file.path: file not found: /mnt/card/not-here.wav",
        f"{f}: source.file.realtim: unknown key (did you mean 'realtime'?)",
        f"{f}: windowing.hop_s: must be a number > 0 and <= 600, got -1",
        f"{f}: prompts[1].kind: must be one of yes_no, label, open, caption, count, got 'nope'",
        f"{f}: prompts[2].labels: a label prompt needs at least two labels",
        f"{f}: mqtt.port: must be an integer 1..65535, got 'abc'",
    ]


def test_check_config_cli_prints_every_problem(tmp_path, base):
    base["bundle"] = {"path": "/opt/not-on-this-machine/bundle"}
    base["mqtt"] = {"host": "127.0.0.1", "port": 0, "keepalive": 30}
    cfg = _write(tmp_path, base)
    r = _cli("check-config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"naturelm-edge: error: {cfg}: bundle.path: directory not found: /opt/not-on-this-machine/bundle",
        f"naturelm-edge: error: {cfg}: mqtt.port: must be an integer 1..65535, got 0",
        f"naturelm-edge: error: {cfg}: mqtt.keepalive: unknown key (did you mean 'keepalive_s'?)",
    ]
