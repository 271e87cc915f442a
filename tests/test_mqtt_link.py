"""The MQTT link and the outbox drainer against a real mosquitto: status and last will, acknowledged delivery across
a broker restart, a wrong password that is reported and retried (never marked connected), TLS with a client
certificate, Home Assistant discovery."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from ha_discovery import check
from mqtt_broker import Subscriber, make_certificates
from test_outbox import make_events

from edge.config import MqttConfig, Secret, TlsConfig
from edge.drainer import OutboxDrainer
from edge.mqtt import MqttLink
from edge.outbox import Outbox
from edge.prompts import parse_prompts

FAST = {"reconnect_min_delay_s": 0.1, "reconnect_max_delay_s": 0.5, "keepalive_s": 5}


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_status_online_then_stopped(mqtt_broker):
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    link = MqttLink(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, **FAST), "rec-1")
    link.start()
    try:
        assert link.connected.wait(10)
        sub.wait_for(lambda s: s.on("/status") == ["online"], what="online")
        assert link.publish_health({"uptime_s": 1}) is True
        sub.wait_for(lambda s: s.on("/health"), what="health")
    finally:
        link.stop()
    sub.wait_for(lambda s: s.on("/status") == ["online", "stopped"], what="stopped")
    # A clean stop is not a death: the broker must not have sent the will.
    time.sleep(0.3)
    assert "offline" not in sub.on("/status")
    sub.close()


def test_last_will_offline_when_the_process_dies(mqtt_broker, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from edge.config import MqttConfig
        from edge.mqtt import MqttLink
        link = MqttLink(MqttConfig(host="127.0.0.1", port={mqtt_broker.port}), "rec-1")
        link.start()
        link.connected.wait(10)
        print("up", flush=True)
        time.sleep(60)
    """))
    sub = Subscriber(mqtt_broker.port, ["naturelm/+/status"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "up"
        sub.wait_for(lambda s: s.on("/status") == ["online"], what="online")
        proc.send_signal(signal.SIGKILL)
        sub.wait_for(lambda s: s.on("/status") == ["online", "offline"], what="the last will")
    finally:
        proc.kill()
        proc.wait()
        sub.close()


def test_wrong_password_is_reported_and_retried_not_connected(mqtt_broker_factory, caplog):
    broker = mqtt_broker_factory(users={"rec": "right"})
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, username="rec", **FAST)
    link = MqttLink(cfg, "rec-1", Secret("wrong"))
    caplog.set_level(logging.INFO, logger="edge.mqtt")
    link.start()
    try:
        assert _wait(lambda: link.connect_failures >= 3, 10)
        assert not link.connected.is_set()
        assert link.publish_event("{}") is None
    finally:
        link.stop()
    refused = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    assert len(refused) >= 3 and all(r.levelno == logging.ERROR for r in refused)
    msg = refused[0].getMessage()
    assert f"MQTT broker 127.0.0.1:{broker.port} refused the connection: Not authorized" in msg
    assert "check mqtt.username and the password" in msg and "retrying in" in msg
    assert "wrong" not in " ".join(r.getMessage() for r in caplog.records)  # the password is never logged

    good = MqttLink(cfg, "rec-1", Secret("right"))
    good.start()
    try:
        assert good.connected.wait(10)
    finally:
        good.stop()


def test_unreachable_broker_backs_off_with_a_reason(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    link = MqttLink(MqttConfig(host="127.0.0.1", port=port, **FAST), "rec-1")
    caplog.set_level(logging.WARNING, logger="edge.mqtt")
    link.start()
    try:
        assert _wait(lambda: link.connect_failures >= 2, 10)
        assert not link.connected.is_set()
    finally:
        link.stop()
    assert "Connection refused" in caplog.records[0].getMessage()


def test_drainer_delivers_everything_across_a_broker_restart(mqtt_broker, tmp_path):
    sub = Subscriber(mqtt_broker.port, ["naturelm/+/events"])
    box = Outbox(tmp_path / "o.sqlite3", 10**7, 10**5)
    link = MqttLink(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, **FAST), "rec-1")
    drainer = OutboxDrainer(box, link, max_inflight=5)
    link.start()
    drainer.start()
    try:
        box.add(make_events(10))
        sub.wait_for(lambda s: len(s.events()) == 10, what="the first 10 events")
        assert _wait(lambda: box.depth == 0)

        mqtt_broker.stop()
        assert _wait(lambda: not link.connected.is_set())
        for i in range(5):
            box.add(make_events(4, index=i))  # the network is down: everything waits in the outbox
        assert box.depth == 20
        mqtt_broker.start()

        sub.wait_for(lambda s: len({e["seq"] for e in s.events()}) == 30, timeout=20, what="all 30 events")
        assert _wait(lambda: box.depth == 0)
        assert sorted({e["seq"] for e in sub.events()}) == list(range(30))
        assert link.connects == 2
    finally:
        drainer.stop()
        link.stop()
        sub.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_a_client_certificate(mqtt_broker_factory, tmp_path, caplog):
    certs = make_certificates(tmp_path / "certs")
    broker = mqtt_broker_factory(tls={"ca": certs["ca.crt"], "cert": certs["server.crt"], "key": certs["server.key"]})
    tls = TlsConfig(ca=certs["ca.crt"], cert=certs["client.crt"], key=certs["client.key"])
    link = MqttLink(MqttConfig(host="127.0.0.1", port=broker.port, tls=tls, **FAST), "rec-1")
    link.start()
    try:
        assert link.connected.wait(10)
    finally:
        link.stop()

    # The broker's certificate checked against another CA: refused, said why, retried.
    other = make_certificates(tmp_path / "other")
    caplog.set_level(logging.WARNING, logger="edge.mqtt")
    bad = MqttLink(MqttConfig(host="127.0.0.1", port=broker.port, **FAST,
                              tls=TlsConfig(ca=other["ca.crt"], cert=certs["client.crt"], key=certs["client.key"])),
                   "rec-1")
    bad.start()
    try:
        assert _wait(lambda: bad.connect_failures >= 2, 10) and not bad.connected.is_set()
    finally:
        bad.stop()
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.records[0].getMessage()


def test_home_assistant_discovery(mqtt_broker):
    prompts = parse_prompts([{"id": "crow", "kind": "yes_no", "text": "Crow? Answer yes or no."},
                             {"id": "owl", "kind": "yes_no", "text": "Owl? Answer yes or no."},
                             {"id": "caption", "kind": "caption", "text": "Caption the audio."}], "test")
    link = MqttLink(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, homeassistant_discovery=True, **FAST), "rec-1")
    link.set_discovery(prompts)
    link.start()
    try:
        assert link.connected.wait(10)
        time.sleep(0.5)  # the configs queued on connect reach the broker
        # Retained: a Home Assistant that connects later still finds them.
        sub = Subscriber(mqtt_broker.port, ["homeassistant/#"], client_id="ha")
        sub.wait_for(lambda s: len(s.messages) == 13, what="6 sensors, 5 problem and 2 detection binary sensors")
        configs = {t: json.loads(p) for t, p, _ in sub.messages}
        for t, p, _ in sub.messages:
            check(t, p)  # Home Assistant's discovery schema (tests/ha_discovery.py)
        crow = configs["homeassistant/binary_sensor/rec-1/crow/config"]
        assert crow["state_topic"] == "naturelm/rec-1/state/crow" and crow["unique_id"] == "naturelm_rec-1_crow"
        assert crow["availability"][0]["topic"] == "naturelm/rec-1/status"
        assert "homeassistant/sensor/rec-1/rtf/config" in configs
        assert not any("caption" in t for t in configs)  # free text is not a binary sensor
        assert all(r for _, _, r in sub.messages)

        link.set_discovery(prompts[:1])  # a SIGHUP removed the owl prompt: its entity goes away
        sub.wait_for(lambda s: s.on("/owl/config")[-1:] == [""], what="the owl entity removed")
        sub.close()
    finally:
        link.stop()


def test_a_dropped_connection_is_logged_with_paho_reason_code_and_text(mqtt_broker, caplog):
    """The broker goes away under a connected link: the log says what paho says (its error code, text and the
    disconnect reason code with its number), never a bare "(Unspecified error)"."""
    link = MqttLink(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, **FAST), "rec-1")
    caplog.set_level(logging.INFO, logger="edge.mqtt")
    link.start()
    try:
        assert link.connected.wait(10)
        mqtt_broker.stop()
        assert _wait(lambda: any("lost the connection" in r.getMessage() for r in caplog.records), 10)
    finally:
        link.stop()
    line = next(r.getMessage() for r in caplog.records if "lost the connection" in r.getMessage())
    assert f"lost the connection to MQTT broker 127.0.0.1:{mqtt_broker.port}: The connection was lost " \
           "(MQTT_ERR_CONN_LOST, rc 7)" in line, line
    assert "reason code 128 Unspecified error (client side)" in line, line
    assert not any(r.getMessage().endswith("(Unspecified error)") for r in caplog.records)


def test_a_frozen_broker_is_logged_as_a_keepalive_timeout(mqtt_broker, caplog):
    link = MqttLink(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, **FAST), "rec-1")
    caplog.set_level(logging.INFO, logger="edge.mqtt")
    link.start()
    try:
        assert link.connected.wait(10)
        mqtt_broker.pause()  # SIGSTOP: the socket stays open, nothing answers
        assert _wait(lambda: any("lost the connection" in r.getMessage() for r in caplog.records), 20)
    finally:
        mqtt_broker.resume()
        link.stop()
    line = next(r.getMessage() for r in caplog.records if "lost the connection" in r.getMessage())
    assert f"lost the connection to MQTT broker 127.0.0.1:{mqtt_broker.port}: reason code 141 Keep alive timeout " \
           "(client side); no answer from the broker within keepalive_s (5 s)" in line, line
