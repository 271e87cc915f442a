"""The unit's credential, as the installer leaves it: `LoadCredential=mqtt-password:/etc/naturelm-edge/mqtt-password`
fails the unit (243/CREDENTIALS) when the file is missing, so the installer creates it empty. Here the daemon runs as
systemd would start it (a $CREDENTIALS_DIRECTORY holding that empty file) against a real mosquitto: anonymous when
the config names no credential; exit status 2 with one line when the config names it and it is empty, a status the
unit does not restart on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from mqtt_broker import Subscriber
from test_daemon_e2e import _config, _wav

ROOT = Path(__file__).resolve().parents[1]


def _creds(tmp_path: Path) -> Path:
    d = tmp_path / "credentials"
    d.mkdir()
    (d / "mqtt-password").write_bytes(b"")  # what `install -m 0600 /dev/null ...` leaves
    return d


def test_anonymous_broker_with_the_empty_credential(tiny_full_bundle, mqtt_broker, daemons, tmp_path):
    wav = _wav(tmp_path / "a.wav", 3.0)
    cfg = _config(tmp_path, tiny_full_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": False}})
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    d = daemons(cfg, env={"CREDENTIALS_DIRECTORY": str(_creds(tmp_path))})
    assert d.wait(120) == 0, d.log
    sub.wait_for(lambda s: s.on("/status")[-1:] == ["stopped"], what="stopped")
    assert sub.events() and json.loads(sub.on("/health")[-1])["status"] == "online"
    sub.close()


def test_a_named_empty_credential_is_a_config_error_not_a_restart_loop(tiny_full_bundle, mqtt_broker, daemons,
                                                                        tmp_path):
    wav = _wav(tmp_path / "a.wav", 3.0)
    cfg = _config(tmp_path, tiny_full_bundle, mqtt_broker.port,
                  {"type": "file", "file": {"path": str(wav), "realtime": False}})
    data = yaml.safe_load(cfg.read_text())
    data["mqtt"].update(username="recorder", password_credential="mqtt-password")
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    creds = _creds(tmp_path)
    d = daemons(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert d.wait(60) == 2, d.log
    errors = [ln for ln in d.log.splitlines() if ln.startswith("naturelm-edge: error:")]
    assert errors == [f"naturelm-edge: error: {cfg}: mqtt.password_credential: {creds / 'mqtt-password'} is empty"]
    unit = (ROOT / "systemd" / "naturelm-edge.service").read_text()
    assert "RestartPreventExitStatus=2\n" in unit and "LoadCredential=mqtt-password:/etc/naturelm-edge/mqtt-password" in unit
