"""The fleet examples work as shipped: examples/mosquitto/bridge.conf between two real mosquittos (the central one with
TLS and client certificates, as the example expects), and the Home Assistant examples against the entities that the
daemon's own discovery payloads create."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from mqtt_broker import Subscriber, free_port, make_certificates

from edge.config import MqttConfig
from edge.mqtt import MqttLink
from edge.prompts import parse_prompts

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT / "examples" / "mosquitto" / "bridge.conf"
HA = ROOT / "examples" / "homeassistant"


def _bridge_config(central_port: int, certs: dict) -> str:
    """The example with its site-specific values replaced: the central address, the certificate paths, and a short
    reconnect backoff (the test restarts the central broker)."""
    text = BRIDGE.read_text()
    subs = {
        r"^address .*$": f"address 127.0.0.1:{central_port}",
        r"^bridge_cafile .*$": f"bridge_cafile {certs['ca.crt']}",
        r"^bridge_certfile .*$": f"bridge_certfile {certs['client.crt']}",
        r"^bridge_keyfile .*$": f"bridge_keyfile {certs['client.key']}",
        r"^restart_timeout .*$": "restart_timeout 1 2",
    }
    for pattern, value in subs.items():
        text, n = re.subn(pattern, value, text, flags=re.MULTILINE)
        assert n == 1, f"{BRIDGE} has no single line matching {pattern}"
    return text


def _publisher(port: int) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"recorder-side-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_bridge_forwards_listed_recorders_to_the_central_broker(mqtt_broker_factory, tmp_path):
    certs = {p.name: p for p in make_certificates(tmp_path / "certs").values()}
    central = mqtt_broker_factory(tls={"ca": certs["ca.crt"], "cert": certs["server.crt"], "key": certs["server.key"]})
    # A second, plain listener on the central broker for the test's subscriber (the bridge uses the TLS one).
    central_plain = free_port()
    central.stop()
    central.conf.write_text(central.conf.read_text() + f"listener {central_plain} 127.0.0.1\n")
    central.start()
    site = mqtt_broker_factory()
    site.stop()
    site.conf.write_text(site.conf.read_text() + "max_queued_messages 100000\n" +
                         _bridge_config(central.port, certs))
    site.start()

    sub = Subscriber(central_plain, ["naturelm/#", "homeassistant/#"], client_id="central-dashboard")
    sub.wait_for(lambda s: s.on("/bridges/site-a/state")[-1:] == ["1"], timeout=20, what="the bridge connected")

    pub = _publisher(site.port)
    # recorder-03 is not in the bridge's list; site.b.rec-7 has dots in its id (and so a different discovery node id)
    for device in ("recorder-01", "recorder-02", "recorder-03", "site.b.rec-7"):
        pub.publish(f"naturelm/{device}/status", "online", qos=1, retain=True)
        for seq in range(3):
            pub.publish(f"naturelm/{device}/events", json.dumps({"device_id": device, "seq": seq}), qos=1).wait_for_publish(5)
    pub.publish("homeassistant/binary_sensor/recorder-02/crow/config", json.dumps({"name": "crow"}), qos=1,
                retain=True).wait_for_publish(5)
    # The dotted recorder's real discovery topics, as its daemon names them.
    dotted = MqttLink(MqttConfig(homeassistant_discovery=True), "site.b.rec-7")
    dotted.set_discovery(parse_prompts([{"id": "crow", "kind": "yes_no", "text": "Crow?"}], "t"))
    for topic, payload in dotted._discovery_payloads.items():
        pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    def got(s, device):
        # QoS 1 is at least once: a redelivery after a reconnect is allowed, a loss is not.
        return sorted({json.loads(p)["seq"] for t, p, _ in s.messages if t == f"naturelm/{device}/events"})

    sub.wait_for(lambda s: got(s, "recorder-01") == [0, 1, 2] and got(s, "recorder-02") == [0, 1, 2]
                 and got(s, "site.b.rec-7") == [0, 1, 2]
                 and s.on("homeassistant/binary_sensor/recorder-02/crow/config")
                 and len([t for t, _, _ in s.messages if "/site_b_rec-7/" in t]) == len(dotted._discovery_payloads),
                 timeout=20, what="forwarded events and discovery configs")
    assert sub.on("naturelm/recorder-01/status") == ["online"]
    # A retained status reaches a dashboard that subscribes later, through the bridge, as retained.
    late = Subscriber(central_plain, ["naturelm/+/status"], client_id="late-dashboard")
    late.wait_for(lambda s: len(s.messages) >= 3, timeout=10, what="retained status")
    assert {(t, p, r) for t, p, r in late.messages} == {("naturelm/recorder-01/status", "online", True),
                                                        ("naturelm/recorder-02/status", "online", True),
                                                        ("naturelm/site.b.rec-7/status", "online", True)}
    late.close()

    # The uplink goes down; the recorders keep publishing to the site broker, which queues for the bridge.
    central.stop()
    for seq in range(3, 8):
        pub.publish("naturelm/recorder-01/events", json.dumps({"device_id": "recorder-01", "seq": seq}),
                    qos=1).wait_for_publish(5)
    central.start()
    sub.wait_for(lambda s: got(s, "recorder-01") == list(range(8)), timeout=30, what="events queued during the outage")

    time.sleep(0.5)
    assert not [t for t, _, _ in sub.messages if "recorder-03" in t]  # not listed: stays on the site
    pub.loop_stop()
    pub.disconnect()
    sub.close()


# --- Home Assistant -----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    """Home Assistant's slugify for entity ids, for the ASCII names used here."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", text.lower())).strip("_")


def _discovered_entities(device_id: str, prompts) -> set[str]:
    link = MqttLink(MqttConfig(homeassistant_discovery=True), device_id)
    link.set_discovery(prompts)
    ids = set()
    for topic, payload in link._discovery_payloads.items():
        component = topic.split("/")[1]
        cfg = json.loads(payload)
        ids.add(f"{component}.{_slug(cfg['device']['name'] + ' ' + cfg['name'])}")
    return ids


def _entity_refs(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("entity", "entity_id") and isinstance(v, str):
                found.add(v)
            else:
                found |= _entity_refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= _entity_refs(v)
    elif isinstance(node, str):
        found |= set(re.findall(r"\b(?:binary_sensor|sensor)\.naturelm_[a-z0-9_]+", node))
    return found


def test_home_assistant_examples_use_the_discovered_entities_and_topics():
    prompts = parse_prompts([{"id": "crow", "kind": "yes_no", "text": "Is there a crow? Answer yes or no."}], "ha")
    entities = _discovered_entities("recorder-01", prompts)
    assert "binary_sensor.naturelm_recorder_01_crow" in entities
    automations = yaml.safe_load((HA / "automations.yaml").read_text())
    card = yaml.safe_load((HA / "dashboard-card.yaml").read_text())
    refs = _entity_refs(automations) | _entity_refs(card)
    assert refs and refs <= entities, f"not created by discovery: {sorted(refs - entities)}"
    assert {a["id"] for a in automations} >= {"naturelm_crow_detected", "naturelm_recorder_offline"}

    # MQTT triggers read fields that the daemon's payloads have.
    from edge.events import load_schema

    event_fields = set(load_schema()["properties"])
    for a in automations:
        for trig in a["triggers"]:
            if trig["trigger"] != "mqtt":
                continue
            assert paho.topic_matches_sub(trig["topic"], "naturelm/recorder-01/events") or \
                paho.topic_matches_sub(trig["topic"], "naturelm/recorder-01/health")
            for name in re.findall(r"value_json\.(\w+)", trig["value_template"]):
                assert name in event_fields or name in ("scheduling",), name

    # What the examples read from payloads and attributes exists there: event fields (the window's own time, the
    # lateness fields), the detection state's attributes, the degraded reason's.
    from edge.detections import DetectionTracker
    from edge.events import Event, WindowInfo

    text = (HA / "automations.yaml").read_text()
    health_fields = {"device_id", "scheduling", "temperature_max_c", "rtf"}
    for name in re.findall(r"trigger\.payload_json\.(\w+)", text):
        assert name in event_fields or name in health_fields, name
    assert "trigger.payload_json.window.start" in text and "trigger.payload_json.late" in text
    w = WindowInfo(index=0, offset_s=0.0, duration_s=10.0, start_utc=datetime.now(timezone.utc))
    change = DetectionTracker(30.0).observe(w, [Event("r", "mic", w, "crow", "yes_no", "Yes", 0.9, {}, {},
                                                      positive=True)])[0]
    for entity, attr in re.findall(r"state_attr\('?([\w.]+)'?, '(\w+)'\)", text):
        allowed = {"reason", "since"} if "trigger.entity_id" in entity else set(change.message)
        assert attr in allowed, (entity, attr)


@pytest.mark.parametrize("path", sorted(p.name for p in HA.glob("*.yaml")))
def test_home_assistant_examples_are_plain_yaml(path):
    yaml.safe_load((HA / path).read_text())  # no custom tags: pasteable anywhere


def test_the_birdnet_go_sensor_example_reads_fields_of_the_compatible_payload():
    from test_dashboards import BIRDNET_FIELDS

    text = (HA / "birdnet-go-sensor.yaml").read_text()
    sensors = yaml.safe_load(text)["sensor"]
    assert {s["state_topic"] for s in sensors} == {"naturelm/recorder-01/birdnet"}
    names = set(re.findall(r"value_json\.(\w+)", text))
    assert names and names <= set(BIRDNET_FIELDS), names - set(BIRDNET_FIELDS)
