"""What dashboards and Home Assistant meet: detection lifecycles that end, per-prompt retained state topics, discovery
payloads that pass Home Assistant's schema, lateness after a broker outage, the BirdNET-Go-compatible payload, and
remote control limited to what the config allows.

The daemon runs in process with a scripted stand-in pipeline (the answers a test needs, window by window) against a
real mosquitto; a subscriber plays Home Assistant's part (it reads the discovery configs and follows the topics they
name)."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import jsonschema
import numpy as np
import pytest
import soundfile as sf
import yaml
from fake_pipeline import FakePipeline, WindowResult
from ha_discovery import SCHEMAS, check
from mqtt_broker import Subscriber

import edge.daemon
from edge.config import MqttConfig, load_config
from edge.detections import DetectionTracker
from edge.events import Event, WindowInfo, load_schema
from edge.mqtt import MqttLink, discovery_payloads
from edge.prompts import parse_prompts

T0 = datetime(2026, 6, 1, 4, 0, 0, tzinfo=timezone.utc)
MODEL = {"bundle_id": "b", "quantization": "Q4_K_M", "encoder_provider": "cpu"}


def _w(i: int, hop: float = 5.0, dur: float = 10.0) -> WindowInfo:
    return WindowInfo(index=i, offset_s=i * hop, duration_s=dur, start_utc=T0 + timedelta(seconds=i * hop))


def _ev(w: WindowInfo, pid: str, positive: bool, kind: str = "yes_no", answer=None, score=0.9) -> Event:
    return Event(device_id="rec-1", source="mic", window=w, prompt_id=pid, kind=kind,
                 answer=answer if answer is not None else ("Yes" if positive else "No"), score=score, model=MODEL,
                 timing_ms={}, positive=positive)


# --- the lifecycle ---------------------------------------------------------------------------------------------------


def test_overlapping_windows_are_one_detection_that_ends_after_the_quiet_time():
    t = DetectionTracker(quiet_s=10.0)
    phases = []
    for i in range(12):
        w = _w(i)  # 10 s windows every 5 s: each moment is heard by two windows
        events = [_ev(w, "owl", positive=i in (2, 3))]  # one call around 12-18 s, heard by windows 2 and 3
        phases += [(i, c.phase) for c in t.observe(w, events)]
        phases += [(i, c.phase) for c in t.advance(w)]
        if i in (2, 3):
            assert events[0].detection["phase"] == ("start" if i == 2 else "update")
    assert [p for _, p in phases] == ["start", "update", "end"]
    # the call's last positive window ends at 25 s; window 5 ends at 35 s: quiet for 10 s
    assert phases[-1][0] == 5 and t.started == 1 and t.ended == 1


def test_windows_without_an_answer_still_end_a_detection():
    """Gated, out of schedule, shed or withheld: no events at all, but time moves on."""
    t = DetectionTracker(quiet_s=5.0)
    assert [c.phase for c in t.observe(_w(0), [_ev(_w(0), "owl", True)])] == ["start"]
    ended = []
    for i in range(1, 4):
        ended += t.advance(_w(i))  # no observe: nothing was asked
    assert [c.phase for c in ended] == ["end"]
    assert ended[0].message["state"] == "OFF" and ended[0].message["windows"] == 1


def test_a_gap_longer_than_the_quiet_time_starts_a_new_detection_and_labels_are_separate():
    t = DetectionTracker(quiet_s=5.0)
    first = t.observe(_w(0), [_ev(_w(0), "sp", True, "label", "Strix aluco_Tawny Owl")])[0].detection
    other = t.observe(_w(1), [_ev(_w(1), "sp", True, "label", "Bubo bubo_Eurasian Eagle-Owl")])[0].detection
    assert first.id != other.id and first.first_of_day and other.first_of_day
    later = t.observe(_w(8), [_ev(_w(8), "sp", True, "label", "Strix aluco_Tawny Owl")])
    assert [c.phase for c in later] == ["end", "start"]  # 40 s > 15 s + 5 s: a new call, a new id
    assert later[1].detection.id != first.id and not later[1].detection.first_of_day  # same local day


def test_idle_expiry_ends_detections_only_when_no_window_comes():
    t = DetectionTracker(quiet_s=5.0, idle_s=1.0)
    t.observe(_w(0), [_ev(_w(0), "owl", True)])
    assert t.expire_idle(time.monotonic()) == []
    time.sleep(0.6)
    t.advance(_w(0))  # a slow model: windows still come, if slowly
    time.sleep(0.6)
    assert t.expire_idle() == []  # 1.2 s since the start, but only 0.6 s since the last window
    assert [c.phase for c in t.expire_idle(time.monotonic() + 2.0)] == ["end"]


# --- discovery against Home Assistant's schema -----------------------------------------------------------------------

PROMPTS = [{"id": "crow", "kind": "yes_no", "text": "Crow? Answer yes or no."},
           {"id": "species", "kind": "label", "text": "Which species?", "labels": ["Strix aluco_Tawny Owl",
                                                                                  "Corvus corone_Carrion Crow"]},
           {"id": "caption", "kind": "caption", "text": "Caption the audio."}]


@pytest.mark.parametrize("device_id", ["rec-1", "site.a.rec-1"])
def test_every_discovery_payload_passes_home_assistants_schema(device_id):
    link = MqttLink(MqttConfig(homeassistant_discovery=True), device_id)
    link.expire_after_s = 180
    payloads = discovery_payloads(link, parse_prompts(PROMPTS, "t"))
    seen = {}
    for topic, payload in payloads.items():
        component, cfg = check(topic, payload)
        seen.setdefault(component, []).append(cfg)
        assert cfg["origin"]["name"] == "naturelm-edge"
        assert cfg["availability"][0]["topic"] == f"naturelm/{device_id}/status"
    numeric = {c["unique_id"].rsplit("_", 1)[-1]: c for c in seen["sensor"]}
    assert all(c["state_class"] and c["unit_of_measurement"] for c in seen["sensor"])
    temp = next(c for c in seen["sensor"] if c["name"] == "temperature")
    assert (temp["device_class"], temp["unit_of_measurement"], temp["state_class"]) == ("temperature", "°C",
                                                                                        "measurement")
    assert len(numeric) == 6
    detections = [c for c in seen["binary_sensor"] if c.get("device_class") != "problem"]
    assert {c["state_topic"] for c in detections} == {f"naturelm/{device_id}/state/crow",
                                                      f"naturelm/{device_id}/state/species"}
    assert all(c["expire_after"] == 180 for c in detections)
    problems = {c["unique_id"].split("_degraded_")[1] for c in seen["binary_sensor"] if c.get("device_class") == "problem"}
    assert problems >= {"gpu_fallback", "no_audio", "windows_failing", "encoder_accuracy"}


def test_the_schema_check_catches_what_home_assistant_would_silently_drop():
    good = {"name": "x", "state_topic": "a/b", "unit_of_measurement": "s", "device_class": "duration",
            "state_class": "measurement", "device": {"identifiers": ["i"]}}
    check("homeassistant/sensor/n/x/config", json.dumps(good))
    for bad, why in (({**good, "unit_of_measurment": "s"}, "Additional properties"),
                     ({**good, "unit_of_measurement": "°C"}, "unit not valid"),
                     ({**good, "expire_after": "60"}, "is not of type"),
                     ({**good, "device": {"name": "no identifier"}}, "is not valid"),
                     ({**good, "origin": {"sw_version": "1"}}, "'name' is a required property")):
        with pytest.raises(AssertionError, match=why):
            check("homeassistant/sensor/n/x/config", json.dumps(bad))
    with pytest.raises(AssertionError, match="not a discovery topic"):
        check("homeassistant/sensor/site.a/x/config", json.dumps(good))
    assert set(SCHEMAS) == {"sensor", "binary_sensor"}


# --- the daemon, in process, against a real broker ------------------------------------------------------------------


@dataclass
class ScriptedPipeline(FakePipeline):
    """answers(window_index, prompt) -> (answer, score, positive), or None for no answer; gate(window_index) -> True
    for a window the activity gate skips."""

    answers: object = None
    gate: object = None
    seen: list = field(default_factory=list)

    def process(self, samples, sample_rate, window, source, prompts=None):
        self.running.wait()
        self.seen.append(window.index)
        if self.gate is not None and self.gate(window.index):
            return WindowResult(events=[], gated=True, timings={"total": 0.1})
        model = {k: self.info[k] for k in ("bundle_id", "quantization", "encoder_provider", "encoder_precision")}
        events = []
        for p in (prompts if prompts is not None else self.prompts):
            a = self.answers(window.index, p)
            if a is None:
                continue
            answer, score, positive = a
            events.append(Event(device_id=self.device_id, source=source, window=window, prompt_id=p.id, kind=p.kind,
                                answer=answer, score=score, positive=positive, model=model,
                                timing_ms={"total": 2.0}, question=p.text))
        return WindowResult(events=events, gated=False, timings={"total": 2.0})


class Running:
    """edge.daemon.Daemon on a thread, with a scripted pipeline."""

    def __init__(self, tmp_path, monkeypatch, port: int, pipeline: ScriptedPipeline, prompts=PROMPTS, **over):
        sf.write(str(tmp_path / "a.wav"), 0.2 * np.ones(8000 * 4, dtype=np.float32), 8000)
        (tmp_path / "bundle").mkdir(exist_ok=True)
        cfg = {"device_id": over.pop("device_id", "rec-1"), "state_dir": str(tmp_path / "state"), "bundle": {"path": "bundle"},
               "source": {"type": "file", "file": {"path": "a.wav", "realtime": True, "loop": True}},
               "windowing": {"window_s": 1.0, "hop_s": 0.5},
               "prompts": prompts,
               "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_delay_s": 0.1,
                        "reconnect_max_delay_s": 0.3, "keepalive_s": 5, "homeassistant_discovery": True},
               "health": {"interval_s": 0.5}, "watchdog": {"enabled": False},
               "detections": {"quiet_s": 1.0}}
        for k, v in over.items():
            cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) else v
        (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(cfg))
        self.pipeline = pipeline
        monkeypatch.setattr(edge.daemon, "_open_pipeline", lambda c: (pipeline.set_prompts(c.prompts), pipeline)[1])
        self.daemon = edge.daemon.Daemon(load_config(tmp_path / "daemon.yaml"))
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False})
        self.thread.start()
        deadline = time.monotonic() + 10
        while not hasattr(self.daemon, "live") and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self):
        self.pipeline.running.set()
        self.daemon.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _states(sub: Subscriber, pid: str) -> list[dict]:
    """The prompt's state messages, without the heartbeat's repeats (Home Assistant records no change for them)."""
    out = []
    for p in sub.on(f"/state/{pid}"):
        if not out or out[-1] != p:
            out.append(p)
    return [json.loads(p) for p in out]


def test_home_assistant_sees_a_detection_go_on_and_then_off_on_its_own_state_topic(mqtt_broker, tmp_path,
                                                                                    monkeypatch):
    ha = Subscriber(mqtt_broker.port, ["homeassistant/#", "naturelm/#"], client_id="home-assistant")

    def answers(i, p):
        if p.kind == "caption":
            return ("wind", None, None)
        if p.id == "crow":
            return ("Yes", 0.9, True) if i in (3, 4, 5) else ("No", 0.1, False)
        return ("Corvus corone_Carrion Crow", 0.2, False)

    # After window 8 every window is gated: no answers at all, yet the crow detection must end.
    pipe = ScriptedPipeline([], "rec-1", answers=answers, gate=lambda i: i > 8)
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe)
    try:
        ha.wait_for(lambda s: any(json.loads(p).get("state") == "OFF" and json.loads(p).get("phase") == "end"
                                  for p in s.on("/state/crow")), timeout=30, what="the crow detection to end")
        assert run.thread.is_alive()  # it ended by the quiet time, not by a shutdown
        # Home Assistant's side: the discovery config names the state topic it then follows.
        configs = {t: json.loads(p) for t, p, _ in ha.messages if t.startswith("homeassistant/") and p}
        for t, c in configs.items():
            check(t, json.dumps(c))
        crow_cfg = configs["homeassistant/binary_sensor/rec-1/crow/config"]
        assert crow_cfg["state_topic"] == "naturelm/rec-1/state/crow"
        crow = _states(ha, "crow")
        assert [m["state"] for m in crow] == ["OFF", "ON", "ON", "ON", "OFF"]  # reset, start, 2 updates, end
        assert [m["phase"] for m in crow[1:]] == ["start", "update", "update", "end"]
        assert len({m["detection_id"] for m in crow[1:]}) == 1 and crow[-1]["windows"] == 3
        # Per-prompt topics: the species entity never saw crow's messages, and only its own reset.
        assert [m["state"] for m in _states(ha, "species")] == ["OFF"]
        assert not [t for t, _, _ in ha.messages if t.endswith("/state/caption")]
        # Retained: a Home Assistant that connects now reads OFF at once.
        late = Subscriber(mqtt_broker.port, ["naturelm/rec-1/state/+"], client_id="ha-restarted")
        late.wait_for(lambda s: len(s.messages) >= 2, what="retained states")
        assert {t: json.loads(p)["state"] for t, p, r in late.messages if r} == {
            "naturelm/rec-1/state/crow": "OFF", "naturelm/rec-1/state/species": "OFF"}
        late.close()
        # The event stream still has every answer, with the detection id on the positive ones.
        schema = load_schema()
        events = ha.events()
        for e in events:
            jsonschema.validate(e, schema)
        pos = [e for e in events if e["prompt_id"] == "crow" and e.get("positive")]
        assert [e["detection"]["phase"] for e in pos] == ["start", "update", "update"]
        assert {e["detection"]["id"] for e in pos} == {crow[1]["detection_id"]}
        assert all(e["replayed"] is False and e["late"] is False and e["age_s"] < 30 for e in events)
    finally:
        run.stop()
        ha.close()


def test_lateness_after_a_broker_outage(mqtt_broker, tmp_path, monkeypatch):
    sub = Subscriber(mqtt_broker.port, ["naturelm/rec-1/events", "naturelm/rec-1/birdnet"], client_id="consumer")

    def answers(i, p):
        # a new owl call every 2 s (more than the quiet time apart): a detection start, and a notification, each
        return ("Strix aluco_Tawny Owl", 0.8, True) if i % 4 == 0 else ("Strix aluco_Tawny Owl", 0.1, False)

    pipe = ScriptedPipeline([], "rec-1", answers=answers)
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[1:2],
                  detections={"quiet_s": 0.4, "max_live_age_s": 1.5, "birdnet": {"enabled": True}})
    try:
        sub.wait_for(lambda s: len(s.events()) >= 2, what="live events")
        mqtt_broker.stop()
        t_down = time.monotonic()
        before = max(e["seq"] for e in sub.events())
        time.sleep(3.0)  # windows keep coming: their events wait in the outbox, older than max_live_age_s
        mqtt_broker.start()
        n_live = len(sub.events())
        sub.wait_for(lambda s: any(e["replayed"] for e in s.events()) and
                     any(not e["replayed"] for e in s.events()[n_live:]), timeout=30, what="replayed then live events")
        outage = time.monotonic() - t_down
        events = {e["event_id"]: e for e in sub.events()}.values()  # at least once: de-duplicate on event_id
        replayed = [e for e in events if e["replayed"] and e["seq"] > before]
        # The oldest waited through (almost) the whole outage; the youngest were made just before the link came back.
        assert replayed and max(e["age_s"] for e in replayed) > 2.0
        assert any(e["late"] for e in replayed)  # the oldest waited longer than max_live_age_s
        assert max(e["age_s"] for e in replayed) < outage + 5
        for e in events:
            jsonschema.validate(e, load_schema())
            published = datetime.strptime(e["published"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
            end = datetime.strptime(e["window"]["end"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
            assert abs((published - end).total_seconds() - e["age_s"]) < 0.01
        # Notifications made during the outage were too old by the time the link came back: not sent late.
        assert run.daemon.link.live_dropped_late >= 1
    finally:
        run.stop()
        sub.close()


# --- BirdNET-Go compatibility ---------------------------------------------------------------------------------------

#: The payload of BirdNET-Go's MQTT detection message, field -> JSON type, from NoteWithBirdImage
#: (tphakala/birdnet-go internal/analysis/processor/actions_integrations.go) over datastore.Note
#: (internal/datastore/model.go), as Go's encoding/json writes them; ID and Source are suppressed there.
BIRDNET_FIELDS = {
    "SourceNode": str, "AudioSourceID": str, "Date": str, "Time": str, "BeginTime": str, "EndTime": str,
    "SpeciesCode": str, "ScientificName": str, "CommonName": str, "Confidence": float, "Latitude": float,
    "Longitude": float, "Threshold": float, "Sensitivity": float, "ClipName": str, "ProcessingTime": int,
    "Results": type(None), "Review": type(None), "Comments": type(None), "Lock": type(None), "Verified": str,
    "Locked": bool, "detectionId": int, "sourceId": str, "sourceName": str, "BirdImage": dict,
}
BIRD_IMAGE_FIELDS = {"URL", "ScientificName", "LicenseName", "LicenseURL", "AuthorName", "AuthorURL", "CachedAt",
                     "SourceProvider"}


def test_birdnet_go_compatible_payload_with_cooldown(mqtt_broker, tmp_path, monkeypatch):
    sub = Subscriber(mqtt_broker.port, ["birds/#", "naturelm/rec-1/events"], client_id="bird-card")

    def answers(i, p):
        # two separate owl calls (windows 2-3 and 8-9, more than the quiet time apart), then a crow
        if i in (2, 3, 8, 9):
            return ("Strix aluco_Tawny Owl", 0.81, True)
        if i in (14, 15):
            return ("Corvus corone_Carrion Crow", 0.66, True)
        return ("Strix aluco_Tawny Owl", 0.2, False)

    pipe = ScriptedPipeline([], "rec-1", answers=answers)
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[1:2],
                  site={"latitude": 60.17, "longitude": 24.94},
                  detections={"quiet_s": 0.5, "cooldown_s": 600,
                              "birdnet": {"enabled": True, "topic": "birds/detections"}})
    try:
        sub.wait_for(lambda s: len(s.on("birds/detections")) >= 2, timeout=30, what="two BirdNET messages")
        sub.wait_for(lambda s: any(e["window"]["index"] >= 12 for e in s.events()), what="window 12")
        msgs = [json.loads(p) for p in sub.on("birds/detections")]
        # The second owl call is within the cooldown: no second owl message. The crow is another species.
        assert [m["CommonName"] for m in msgs] == ["Tawny Owl", "Carrion Crow"]
        assert run.daemon.live.suppressed["cooldown"] == 1
        m = msgs[0]
        assert {k: type(v) for k, v in m.items() if k != "naturelmDetectionId"} == BIRDNET_FIELDS
        assert set(m["BirdImage"]) == BIRD_IMAGE_FIELDS
        assert m["ScientificName"] == "Strix aluco" and m["Confidence"] == 0.81
        assert (m["Latitude"], m["Longitude"]) == (60.17, 24.94) and m["Threshold"] == 0.5
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m["Date"]) and re.fullmatch(r"\d{2}:\d{2}:\d{2}", m["Time"])
        begin = datetime.fromisoformat(m["BeginTime"])  # RFC 3339, as Go writes a time.Time
        assert begin.tzinfo is not None and m["Date"] == begin.strftime("%Y-%m-%d")
        assert m["ProcessingTime"] == 2_000_000  # 2 ms as a Go time.Duration (nanoseconds)
        assert m["SourceNode"] == "rec-1" and m["sourceId"] == m["AudioSourceID"]
        # The events carry the site.
        assert all(e["location"] == {"latitude": 60.17, "longitude": 24.94} for e in sub.events())
    finally:
        run.stop()
        sub.close()


# --- remote control ---------------------------------------------------------------------------------------------------


def test_remote_control_does_only_what_the_config_allows(mqtt_broker, tmp_path, monkeypatch, caplog):
    ctl = Subscriber(mqtt_broker.port, ["naturelm/rec-1/set/result", "naturelm/rec-1/health"], client_id="ctl")

    def answers(i, p):
        return ("Yes", 0.65, 0.65 >= p.threshold) if p.kind == "yes_no" else None

    pipe = ScriptedPipeline([], "rec-1", answers=answers)
    two = [PROMPTS[0], {"id": "owl", "kind": "yes_no", "text": "Owl? Answer yes or no."}]
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=two, health={"interval_s": 3600},
                  remote_control={"enabled": True, "allow": ["health", "set_threshold", "disable_prompt",
                                                             "enable_prompt"],
                                  "prompts": ["crow"], "threshold_min": 0.1, "threshold_max": 0.9})

    def send(payload) -> dict:
        n = len(ctl.on("/set/result"))
        ctl.client.publish("naturelm/rec-1/set", payload if isinstance(payload, bytes) else json.dumps(payload),
                           qos=1)
        ctl.wait_for(lambda s: len(s.on("/set/result")) > n, what="a reply")
        return json.loads(ctl.on("/set/result")[n])

    try:
        assert run.daemon.link.connected.wait(10)
        deadline = time.monotonic() + 10
        while not pipe.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        r = send({"id": "1", "action": "set_threshold", "prompt_id": "crow", "threshold": 0.7})
        assert r == {"id": "1", "action": "set_threshold", "ok": True,
                     "result": {"prompts": ["crow", "owl"], "threshold": 0.7}}
        assert next(p for p in run.daemon.cfg.prompts if p.id == "crow").threshold == 0.7
        assert next(p for p in pipe.prompts if p.id == "crow").threshold == 0.7  # the pipeline asks with it

        refused = [
            ({"id": "2", "action": "set_threshold", "prompt_id": "owl", "threshold": 0.7}, "may not be changed"),
            ({"id": "3", "action": "set_threshold", "prompt_id": "crow", "threshold": 5}, "threshold must be"),
            ({"id": "4", "action": "reboot"}, "action must be one of"),
            ({"id": "5", "action": "health", "extra": 1}, "unknown key"),
            (b"\xff{not json", "not JSON"),
            (b"[1, 2]", "must be a JSON object"),
        ]
        for payload, why in refused:
            r = send(payload)
            assert r["ok"] is False and why in r["error"], (payload, r)
        assert run.daemon.remote.refused == len(refused)
        assert len([rec for rec in caplog.records if "remote control: refused" in rec.getMessage()]) == len(refused)

        n = len(ctl.on("/health"))
        assert send({"id": "6", "action": "health"})["ok"] is True
        ctl.wait_for(lambda s: len(s.on("/health")) > n, what="the requested health message")

        assert send({"id": "7", "action": "disable_prompt", "prompt_id": "crow"})["result"]["prompts"] == ["owl"]
        assert send({"id": "8", "action": "enable_prompt", "prompt_id": "crow"})["ok"] is True
        assert run.thread.is_alive()
    finally:
        run.stop()
        ctl.close()


def test_remote_control_off_and_actions_not_allowed(mqtt_broker, tmp_path, monkeypatch):
    ctl = Subscriber(mqtt_broker.port, ["naturelm/rec-1/set/result"], client_id="ctl2")
    pipe = ScriptedPipeline([], "rec-1", answers=lambda i, p: None)
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[:1])  # remote_control off
    try:
        assert run.daemon.link.connected.wait(10)
        time.sleep(0.3)
        ctl.client.publish("naturelm/rec-1/set", json.dumps({"id": "x", "action": "health"}), qos=1)
        time.sleep(1.0)
        assert ctl.on("/set/result") == [] and run.daemon.remote is None  # not even subscribed
    finally:
        run.stop()
    run2 = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[:1],
                   remote_control={"enabled": True, "allow": ["health"], "prompts": ["crow"]})
    try:
        assert run2.daemon.link.connected.wait(10)
        time.sleep(0.3)
        ctl.client.publish("naturelm/rec-1/set", json.dumps({"id": "y", "action": "disable_prompt",
                                                             "prompt_id": "crow"}), qos=1)
        ctl.wait_for(lambda s: s.on("/set/result"), what="a refusal")
        r = json.loads(ctl.on("/set/result")[0])
        assert r["ok"] is False and "not allowed" in r["error"] and [p.id for p in run2.daemon.cfg.prompts] == ["crow"]
    finally:
        run2.stop()
        ctl.close()


# --- listening endpoints ----------------------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, b"", ""


def test_endpoints_are_off_by_default_and_bind_to_the_loopback(tmp_path):
    from test_daemon_config import _write

    (tmp_path / "bundle").mkdir()
    sf.write(str(tmp_path / "a.wav"), np.zeros(800, dtype=np.float32), 8000)
    cfg = load_config(_write(tmp_path, {"device_id": "r", "bundle": {"path": "bundle"},
                                        "source": {"type": "file", "file": {"path": "a.wav"}},
                                        "prompts": PROMPTS[:1], "mqtt": {}, "state_dir": str(tmp_path / "s")}))
    for ep in (cfg.clip_server, cfg.metrics):
        assert ep.enabled is False and ep.bind == "127.0.0.1"
    assert cfg.remote_control.enabled is False and cfg.remote_control.allow == ()


def test_opus_clips_are_a_fraction_of_the_flac(tmp_path):
    """The bandwidth behind serving Opus by default: a 10 s clip at 48 kHz of a bird-like chirp over noise."""
    from edge.clipserver import to_opus

    sr = 48000
    t = np.arange(10 * sr) / sr
    rng = np.random.default_rng(0)
    x = 0.3 * np.sin(2 * np.pi * (3000 + 1500 * np.sin(2 * np.pi * 4 * t)) * t) + 0.05 * rng.standard_normal(t.size)
    flac = tmp_path / "c.flac"
    sf.write(str(flac), x.astype(np.float32), sr, format="FLAC", subtype="PCM_16")
    opus = to_opus(flac)
    assert opus[:4] == b"OggS"
    back, rate = sf.read(io.BytesIO(opus))
    assert rate == 48000 and abs(len(back) / rate - 10.0) < 0.1
    assert len(opus) * 5 < flac.stat().st_size, (len(opus), flac.stat().st_size)


def test_clip_server_serves_the_clip_of_a_detection_and_nothing_else(mqtt_broker, tmp_path, monkeypatch):
    from mqtt_broker import free_port

    sub = Subscriber(mqtt_broker.port, ["naturelm/rec-1/events"], client_id="dash")
    port = free_port()
    pipe = ScriptedPipeline([], "rec-1", answers=lambda i, p: ("Yes", 0.9, True) if i == 2 else ("No", 0.1, False))
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[:1],
                  clips={"enabled": True}, clip_server={"enabled": True, "port": port})
    try:
        sub.wait_for(lambda s: any(e.get("clip_url") for e in s.events()), what="an event with a clip URL")
        e = next(e for e in sub.events() if e.get("clip_url"))
        assert e["clip_url"].startswith(f"http://127.0.0.1:{port}/clips/") and e["clip_url"].endswith(".opus")
        status, body, ctype = _get(e["clip_url"])
        assert status == 200 and body[:4] == b"OggS" and ctype == "audio/ogg"
        status, body, ctype = _get(e["clip_url"][:-5] + ".flac")
        assert status == 200 and body[:4] == b"fLaC" and ctype == "audio/flac"
        for bad in ("/clips/../daemon.yaml", "/clips/%2e%2e/outbox.flac", "/clips/nope.flac", "/", "/etc/passwd"):
            assert _get(f"http://127.0.0.1:{port}{bad}")[0] == 404, bad
    finally:
        run.stop()
        sub.close()
    with pytest.raises(OSError):  # stopped with the daemon
        _get(f"http://127.0.0.1:{port}/clips/x.flac")


def test_prometheus_metrics_endpoint(mqtt_broker, tmp_path, monkeypatch):
    from mqtt_broker import free_port

    port = free_port()
    pipe = ScriptedPipeline([], "rec-1", answers=lambda i, p: ("Yes", 0.9, True))
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[:1],
                  metrics={"enabled": True, "port": port})
    try:
        deadline = time.monotonic() + 20
        text = ""
        started = re.compile(r'naturelm_edge_detections_started_total\{device_id="rec-1"\} [1-9]')
        while time.monotonic() < deadline and not started.search(text):
            time.sleep(0.2)
            try:
                text = _get(f"http://127.0.0.1:{port}/metrics")[1].decode()
            except OSError:  # not listening yet
                continue
        assert 'naturelm_edge_uptime_seconds{device_id="rec-1"}' in text
        assert 'naturelm_edge_mqtt_connected{device_id="rec-1"} 1.0' in text
        assert started.search(text), text
    finally:
        run.stop()


def test_the_example_acl_lets_only_the_controller_command_a_recorder(mqtt_broker_factory, tmp_path, monkeypatch):
    from pathlib import Path

    acl = Path(__file__).resolve().parents[1] / "examples" / "mosquitto" / "acl"
    users = {"recorder-01": "r-pw", "homeassistant": "ha-pw", "controller": "c-pw"}
    broker = mqtt_broker_factory(users=users)
    broker.stop()
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    broker.start()
    (tmp_path / "pw").write_text("r-pw\n")
    ctl = Subscriber(broker.port, ["naturelm/+/set/result"], client_id="ctl", username="controller", password="c-pw")
    ha = Subscriber(broker.port, ["naturelm/#"], client_id="ha", username="homeassistant", password="ha-pw")
    pipe = ScriptedPipeline([], "recorder-01", answers=lambda i, p: ("No", 0.1, False))
    run = Running(tmp_path, monkeypatch, broker.port, pipe, prompts=PROMPTS[:1], device_id="recorder-01",
                  mqtt={"username": "recorder-01", "password_file": str(tmp_path / "pw")},
                  remote_control={"enabled": True, "allow": ["health"]})
    try:
        assert run.daemon.link.connected.wait(10)
        ha.wait_for(lambda s: s.on("recorder-01/events"), what="the recorder's events, read by Home Assistant")
        time.sleep(0.3)
        # Home Assistant may read, not command: the broker drops its publish, the recorder never sees it.
        ha.client.publish("naturelm/recorder-01/set", json.dumps({"id": "ha", "action": "health"}), qos=1)
        ctl.client.publish("naturelm/recorder-01/set", json.dumps({"id": "ctl", "action": "health"}), qos=1)
        ctl.wait_for(lambda s: s.on("/set/result"), what="the controller's reply")
        time.sleep(0.5)
        assert [json.loads(p)["id"] for p in ctl.on("/set/result")] == ["ctl"]
        assert run.daemon.remote.accepted == 1 and run.daemon.remote.refused == 0
    finally:
        run.stop()
        ctl.close()
        ha.close()


def test_a_reload_gives_new_prompts_a_state_and_clears_removed_ones(mqtt_broker, tmp_path, monkeypatch):
    ha = Subscriber(mqtt_broker.port, ["naturelm/rec-1/state/+", "homeassistant/#"], client_id="ha-reload")
    pipe = ScriptedPipeline([], "rec-1", answers=lambda i, p: None)
    run = Running(tmp_path, monkeypatch, mqtt_broker.port, pipe, prompts=PROMPTS[:2])
    try:
        ha.wait_for(lambda s: s.on("/state/species"), what="the species state")
        cfg = yaml.safe_load((tmp_path / "daemon.yaml").read_text())
        cfg["prompts"] = [PROMPTS[0], {"id": "owl", "kind": "yes_no", "text": "Owl? Answer yes or no."}]
        (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(cfg))
        run.daemon._reload.set()  # what SIGHUP does
        ha.wait_for(lambda s: s.on("/state/owl") and s.on("/state/species")[-1:] == [""]
                    and s.on("binary_sensor/rec-1/species/config")[-1:] == [""], what="owl added, species removed")
        assert json.loads(ha.on("/state/owl")[0])["state"] == "OFF"
        late = Subscriber(mqtt_broker.port, ["naturelm/rec-1/state/+"], client_id="ha-later")
        late.wait_for(lambda s: len(s.messages) >= 2, what="retained states")
        time.sleep(0.3)
        assert sorted(t.rsplit("/", 1)[1] for t, _, r in late.messages if r) == ["crow", "owl"]
        late.close()
    finally:
        run.stop()
        ha.close()


class _Recorder:
    """Stands in for the MQTT link where only what LiveOutputs hands over matters."""

    base = "naturelm/rec-1"

    def __init__(self):
        self.states, self.live = [], []

    def publish_state(self, pid, msg):
        self.states.append((pid, msg))

    def publish_live(self, topic, payload, made=None):
        self.live.append((topic, payload))

    def clear_state(self, pid):
        self.states.append((pid, None))


def _live_cfg(tmp_path, **detections):
    from test_daemon_config import _write

    from edge.live import LiveOutputs

    (tmp_path / "bundle").mkdir(exist_ok=True)
    sf.write(str(tmp_path / "a.wav"), np.zeros(800, dtype=np.float32), 8000)
    cfg = load_config(_write(tmp_path, {"device_id": "rec-1", "bundle": {"path": "bundle"},
                                        "source": {"type": "file", "file": {"path": "a.wav"}},
                                        "prompts": PROMPTS[1:2], "mqtt": {}, "state_dir": str(tmp_path / "s"),
                                        "detections": {"quiet_s": 5, "birdnet": {"enabled": True}, **detections}}))
    link = _Recorder()
    return LiveOutputs(cfg, link), link


def test_notify_only_the_first_detection_of_the_day(tmp_path):
    live, link = _live_cfg(tmp_path, first_of_day=True)
    owl = "Strix aluco_Tawny Owl"
    for i in (0, 10, 20):  # three owl calls, far apart, the same local day
        w = _w(i)
        live.observe(w, [_ev(w, "species", True, "label", owl)], "mic", 5.0)
        for j in range(i + 1, i + 4):
            live.advance(_w(j))
    assert [p["CommonName"] for _, p in link.live] == ["Tawny Owl"]
    assert live.suppressed["not_first_of_day"] == 2
    starts = [m for pid, m in link.states if m and m["phase"] == "start"]
    assert [m["first_of_day"] for m in starts] == [True, False, False]
    # The next local day is a first again.
    nxt = WindowInfo(index=500, offset_s=100000.0, duration_s=10.0, start_utc=T0 + timedelta(days=1))
    live.observe(nxt, [_ev(nxt, "species", True, "label", owl)], "mic", 5.0)
    assert len(link.live) == 2


@pytest.mark.parametrize("label, common, sci", [
    ("Strix aluco_Tawny Owl", "Tawny Owl", "Strix aluco"),
    ("Tawny Owl (Strix aluco)", "Tawny Owl", "Strix aluco"),
    ("Corvus corone", "Corvus corone", "Corvus corone"),
])
def test_labels_give_common_and_scientific_names(label, common, sci):
    from edge.live import split_label

    assert split_label(label) == (common, sci)
