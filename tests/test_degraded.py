"""The degraded state: reasons raised and cleared by key, and the retained status and reasons on a real mosquitto."""

from __future__ import annotations

import json

from mqtt_broker import Subscriber
from test_mqtt_link import FAST

from edge.config import MqttConfig
from edge.degraded import DEGRADED, ONLINE, DegradedState
from edge.mqtt import MqttLink


def test_reasons_by_key():
    seen = []
    d = DegradedState()
    d.on_change = seen.append
    assert d.status == ONLINE
    assert d.set("no_audio", "no audio since 12:00") is True
    assert d.set("no_audio", "no audio since 12:00") is False  # same text: no change, no republish
    assert d.set("gpu_fallback", "encoder on cpu") is True
    assert d.status == DEGRADED and d.reasons() == {"no_audio": "no audio since 12:00", "gpu_fallback": "encoder on cpu"}
    assert d.clear("no_audio") is True and d.clear("no_audio") is False
    assert d.clear("gpu_fallback") is True
    assert d.status == ONLINE
    assert [s["status"] for s in seen] == [DEGRADED, DEGRADED, DEGRADED, ONLINE]


def test_retained_status_follows_reasons(mqtt_broker):
    sub = Subscriber(mqtt_broker.port, ["naturelm/#"])
    state = DegradedState()
    link = MqttLink(MqttConfig(host="127.0.0.1", port=mqtt_broker.port, **FAST), "rec-1", degraded=state)
    link.start()
    try:
        assert link.connected.wait(10)
        sub.wait_for(lambda s: s.on("/status") == ["online"], what="online")
        state.set("no_audio", "no audio since 2026-01-01T00:00:00Z")
        sub.wait_for(lambda s: s.on("/status")[-1:] == ["degraded"], what="degraded")
        sub.wait_for(lambda s: s.on("/degraded") and "no_audio" in json.loads(s.on("/degraded")[-1])["reasons"],
                     what="the reason")
        state.clear("no_audio")
        sub.wait_for(lambda s: s.on("/status")[-1:] == ["online"], what="online again")
        # The reasons topic is published just after the status: wait for it rather than race it.
        sub.wait_for(lambda s: json.loads(s.on("/degraded")[-1]) == {"status": "online", "reasons": {}},
                     what="the reasons cleared")
    finally:
        link.stop()
    # A late subscriber (a dashboard started later) gets the retained state.
    late = Subscriber(mqtt_broker.port, ["naturelm/rec-1/status"], client_id="late")
    late.wait_for(lambda s: s.on("/status") == ["stopped"], what="retained stopped")
    late.close()
    sub.close()
