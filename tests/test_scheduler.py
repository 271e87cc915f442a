"""Thermal- and load-aware prompt scheduling (edge/scheduler.py), active hours and the privacy prompt.

Unit tests drive PromptScheduler with a hand-moved clock and temperature; the daemon tests run the real daemon in
process with a fake thermal zone (a file in the config's scheduling.thermal.zones) and a stand-in engine that is as
slow as a test needs, and check from what the engine was asked which prompts were skipped, when they came back, and
what health counted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import soundfile as sf
import yaml

import edge.daemon
from edge.config import LoadConfig, SchedulingConfig, ThermalConfig, load_config
from edge.errors import ConfigError
from edge.events import Event, WindowInfo
from edge.prompts import parse_prompts
from edge.scheduler import PromptScheduler, read_zone_temperatures

PROMPTS = parse_prompts([
    {"id": "det", "kind": "yes_no", "text": "Is there a crow? Answer yes or no."},
    {"id": "cnt", "kind": "count", "text": "How many individuals are calling?"},
    {"id": "cap", "kind": "caption", "text": "Caption the audio."},
], "test")


def _window(i: int, start: datetime | None = None) -> WindowInfo:
    return WindowInfo(index=i, offset_s=float(i), duration_s=1.0,
                      start_utc=start or datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _scheduler(temp: list, **over) -> tuple[PromptScheduler, Clock]:
    clock = Clock()
    cfg = SchedulingConfig(thermal=ThermalConfig(zones=("zone",), shed_above_c=80, resume_below_c=70, interval_s=0),
                           load=LoadConfig(), shed_step_s=10, resume_step_s=30)
    cfg = replace(cfg, **over)
    s = PromptScheduler(cfg, hop_s=1.0, clock=clock,
                        read_temperatures=lambda zones: {"tj": temp[0]} if temp[0] is not None else {})
    return s, clock


def _ids(plan) -> list[str]:
    return [p.id for p in plan.prompts]


def test_default_priorities_follow_the_kind():
    assert [p.priority for p in PROMPTS] == [20, 10, 0]
    explicit = parse_prompts([{"id": "c", "kind": "caption", "text": "x", "priority": 50}], "t")
    assert explicit[0].priority == 50


def test_heat_sheds_lowest_priority_first_and_resumes_with_hysteresis():
    temp = [50.0]
    s, clock = _scheduler(temp)
    assert _ids(s.plan(PROMPTS, _window(0))) == ["det", "cnt", "cap"]

    temp[0] = 85.0  # hot: the caption goes at once
    plan = s.plan(PROMPTS, _window(1))
    assert _ids(plan) == ["det", "cnt"] and plan.shed == ("cap",) and not plan.full
    clock.t += 5  # still hot, but the last step is younger than shed_step_s
    assert _ids(s.plan(PROMPTS, _window(2))) == ["det", "cnt"]
    clock.t += 5
    assert _ids(s.plan(PROMPTS, _window(3))) == ["det"]  # the count goes next
    clock.t += 100
    assert _ids(s.plan(PROMPTS, _window(4))) == ["det"]  # the highest priority is never shed

    temp[0] = 75.0  # between the thresholds: hold
    clock.t += 100
    assert _ids(s.plan(PROMPTS, _window(5))) == ["det"]
    temp[0] = 65.0  # below resume_below_c: one level back per resume_step_s
    assert _ids(s.plan(PROMPTS, _window(6))) == ["det", "cnt"]
    clock.t += 29
    assert _ids(s.plan(PROMPTS, _window(7))) == ["det", "cnt"]
    clock.t += 1
    plan = s.plan(PROMPTS, _window(8))
    assert _ids(plan) == ["det", "cnt", "cap"] and plan.full

    h = s.health()
    # Per prompt id, every window that skipped it: the caption on windows 1-7, the count on 3-5.
    assert h["skipped"] == {"cap": 7, "cnt": 3}
    assert h["shed_steps"] == 2 and h["resume_steps"] == 2 and h["level"] == 0 and h["reason"] is None


def test_skips_are_counted_only_for_due_prompts():
    temp = [90.0]
    prompts = parse_prompts([{"id": "det", "kind": "yes_no", "text": "x"},
                             {"id": "cap", "kind": "caption", "text": "y", "every_n_windows": 3}], "t")
    s, _ = _scheduler(temp)
    for i in range(6):
        assert _ids(s.plan(prompts, _window(i))) == ["det"]
    assert s.health()["skipped"] == {"cap": 2}  # windows 0 and 3: the others would not have asked it


def test_load_sheds_only_paced_sources_and_resumes_on_a_low_real_time_factor():
    s, clock = _scheduler([None])
    # An unpaced source (a file as fast as possible) always has a full queue: that is not falling behind.
    assert _ids(s.plan(PROMPTS, _window(0), pending=10, paced=False)) == ["det", "cnt", "cap"]
    assert _ids(s.plan(PROMPTS, _window(1), pending=3, paced=True)) == ["det", "cnt"]
    assert s.health()["reason"] == "3 windows waiting >= 3"
    # Windows at this level take 1.2 s per 1 s of audio: behind on average, so a second step after shed_step_s.
    for _ in range(3):
        s.window_done(1.2)
    clock.t += 10
    assert _ids(s.plan(PROMPTS, _window(2), pending=1)) == ["det"]
    assert s.health()["reason"].startswith("real-time factor 1.20")
    # No windows measured at the new level yet: no resume on a load shed, however long it has been.
    clock.t += 100
    assert _ids(s.plan(PROMPTS, _window(3), pending=0)) == ["det"]
    for _ in range(3):
        s.window_done(0.8)  # 0.8 > resume_rtf 0.7: hold
    assert _ids(s.plan(PROMPTS, _window(4), pending=0)) == ["det"]
    for _ in range(8):
        s.window_done(0.3)
    assert _ids(s.plan(PROMPTS, _window(5), pending=0)) == ["det", "cnt"]
    assert s.health()["resume_steps"] == 1


def test_privacy_prompt_is_never_shed():
    prompts = parse_prompts([{"id": "speech", "kind": "yes_no", "text": "Speech?", "priority": -5},
                             {"id": "det", "kind": "yes_no", "text": "Crow?"},
                             {"id": "cap", "kind": "caption", "text": "Caption."}], "t")
    temp = [99.0]
    s, clock = _scheduler(temp)
    s.privacy_prompt = "speech"
    for _ in range(5):
        plan = s.plan(prompts, _window(0))
        clock.t += 10
    assert _ids(plan) == ["speech", "det"]  # levels: -5 (speech, exempt), 0 (cap); 20 stays
    assert "speech" not in s.health()["skipped"]


def test_active_hours_follow_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        prompts = parse_prompts([{"id": "det", "kind": "yes_no", "text": "x"},
                                 {"id": "owl", "kind": "yes_no", "text": "y", "active_hours": "20:00-06:00"},
                                 {"id": "dawn", "kind": "label", "text": "z", "labels": ["a", "b"],
                                  "active_hours": ["04:30-07:00", "18:00-19:00"]}], "t")
        s, _ = _scheduler([None])
        # 19:30 UTC is 21:30 in Berlin (summer time): owls yes, dawn chorus no.
        evening = datetime(2025, 6, 1, 19, 30, tzinfo=timezone.utc)
        assert _ids(s.plan(prompts, _window(0, evening))) == ["det", "owl"]
        assert _ids(s.plan(prompts, _window(1, evening.replace(hour=3)))) == ["det", "owl", "dawn"]  # 05:30
        assert _ids(s.plan(prompts, _window(2, evening.replace(hour=10)))) == ["det"]  # 12:00
        assert s.health()["off_schedule"] == {"dawn": 2, "owl": 1}
        assert prompts[1].active_at(datetime(2025, 1, 1, 5, 59)) and not prompts[1].active_at(datetime(2025, 1, 1, 6))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("value, message", [
    ("25:00-06:00", "hours 00-23"),
    ("20:00", "must be 'HH:MM-HH:MM'"),
    ("06:00-06:00", "is empty or the whole day"),
    ("00:00-24:00", "is empty or the whole day"),
    ([], "must be 'HH:MM-HH:MM'"),
    (["20:00-22:00", 7], r"active_hours\[1\]: must be"),
    ("20:60-22:00", "minutes 00-59"),
    ("24:00-02:00", "24:00 only as an end"),
])
def test_bad_active_hours_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_prompts([{"id": "owl", "kind": "yes_no", "text": "x", "active_hours": value}], "p.yaml", "prompts")
    assert str(e.value).startswith("p.yaml: prompts[0].active_hours") and "\n" not in str(e.value)


def test_read_zone_temperatures(tmp_path):
    for i, (kind, milli) in enumerate((("cpu-thermal", "41500"), ("tj-thermal", "87250"), ("broken", "n/a"))):
        z = tmp_path / f"thermal_zone{i}"
        z.mkdir()
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(milli + "\n")
    (tmp_path / "plain").write_text("30000")
    temps = read_zone_temperatures([str(tmp_path / "thermal_zone*"), str(tmp_path / "plain"), "/nonexistent/*"])
    assert temps == {"cpu-thermal": 41.5, "tj-thermal": 87.2, str(tmp_path / "plain"): 30.0}


# --- config ---------------------------------------------------------------------------------------------------------


def _base(tmp_path) -> dict:
    (tmp_path / "bundle").mkdir(exist_ok=True)
    (tmp_path / "a.wav").write_bytes(b"")
    return {"device_id": "rec", "state_dir": str(tmp_path / "state"), "bundle": {"path": "bundle"},
            "source": {"type": "file", "file": {"path": "a.wav"}},
            "prompts": [{"id": "speech", "kind": "yes_no", "text": "Speech?"},
                        {"id": "cap", "kind": "caption", "text": "Caption.", "every_n_windows": 2}],
            "mqtt": {"host": "127.0.0.1"}}


@pytest.mark.parametrize("over, message", [
    ({"scheduling": {"thermal": {"shed_above_c": 70, "resume_below_c": 70}}},
     "scheduling.thermal.resume_below_c: must be below shed_above_c (70)"),
    ({"scheduling": {"load": {"shed_rtf": 0.5}}}, "scheduling.load.resume_rtf: must be below shed_rtf (0.5)"),
    ({"scheduling": {"load": {"shed_pending": 1, "resume_pending": 1}}}, "scheduling.load.resume_pending: must be"),
    ({"scheduling": {"thermal": {"zones": []}}}, "scheduling.thermal.zones: must be a path or glob"),
    ({"scheduling": {"thermal": {"zone": "x"}}}, "scheduling.thermal.zone: unknown key (did you mean 'zones'?)"),
    ({"privacy": {"prompt_id": "nope"}}, "privacy.prompt_id: names no prompt (prompts: speech, cap)"),
    ({"privacy": {"prompt_id": "cap"}}, "privacy.prompt_id: must name a yes_no prompt; 'cap' is a caption prompt"),
    ({"privacy": {"withhold_events": True}}, "privacy.withhold_events: needs privacy.prompt_id"),
])
def test_scheduling_and_privacy_config_errors(tmp_path, over, message):
    data = {**_base(tmp_path), **over}
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "daemon.yaml")
    assert str(e.value) == f"{tmp_path / 'daemon.yaml'}: {message}" or message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_privacy_prompt_must_be_asked_on_every_window(tmp_path):
    data = _base(tmp_path)
    data["prompts"][0]["active_hours"] = "08:00-18:00"
    data["privacy"] = {"prompt_id": "speech"}
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="must be asked on every window"):
        load_config(tmp_path / "daemon.yaml")


# --- the daemon, in process -----------------------------------------------------------------------------------------


@dataclass
class Result:
    events: list
    gated: bool
    timings: dict
    embedding: np.ndarray | None = None


@dataclass
class SlowPipeline:
    """The pipeline's interface; each asked prompt costs `seconds_per_prompt` (a slow engine). Records what it was
    asked, per window, with the time. Answers Yes to every yes_no prompt unless its id is in `no`."""

    prompts: list = field(default_factory=list)
    device_id: str = "rec"
    seconds_per_prompt: float = 0.0
    no: set = field(default_factory=set)
    asked: list = field(default_factory=list)  # (monotonic, window index, (prompt ids))
    info: dict = field(default_factory=lambda: {"bundle_id": "slow0000", "quantization": "none",
                                                "encoder_provider": "cpu", "encoder_precision": "fp32",
                                                "llm_offload": "none"})

    def set_prompts(self, prompts) -> None:
        self.prompts = list(prompts)

    def process(self, samples, sample_rate, window, source, prompts=None) -> Result:
        due = [p for p in (self.prompts if prompts is None else prompts) if p.due(window.index)]
        time.sleep(self.seconds_per_prompt * len(due))
        self.asked.append((time.monotonic(), window.index, tuple(p.id for p in due)))
        model = {k: self.info[k] for k in ("bundle_id", "quantization", "encoder_provider", "encoder_precision")}
        events = [Event(device_id=self.device_id, source=source, window=window, prompt_id=p.id, kind=p.kind,
                        answer="Yes", score=1.0, model=model, timing_ms={}, question=p.text,
                        positive=p.kind == "yes_no" and p.id not in self.no) for p in due]
        return Result(events=events, gated=False, timings={}, embedding=np.ones(8, dtype=np.float32))


def _run_daemon(tmp_path, monkeypatch, pipeline, **over):
    sf.write(str(tmp_path / "a.wav"), 0.2 * np.ones(8000 * 2, dtype=np.float32), 8000)
    (tmp_path / "bundle").mkdir(exist_ok=True)
    cfg = {
        "device_id": "rec", "state_dir": str(tmp_path / "state"), "bundle": {"path": "bundle"},
        "source": {"type": "file", "file": {"path": "a.wav", "realtime": True, "loop": True}},
        "windowing": {"window_s": 0.2, "hop_s": 0.2, "max_pending": 50},
        "prompts": [{"id": "det", "kind": "yes_no", "text": "Crow?"},
                    {"id": "cnt", "kind": "count", "text": "How many?"},
                    {"id": "cap", "kind": "caption", "text": "Caption."}],
        "mqtt": {"host": "127.0.0.1", "port": 9, "reconnect_min_delay_s": 5},  # no broker: not needed here
        "watchdog": {"enabled": False},
    }
    cfg.update(over)
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(edge.daemon, "_open_pipeline", lambda c: (pipeline.set_prompts(c.prompts), pipeline)[1])
    daemon = edge.daemon.Daemon(load_config(tmp_path / "daemon.yaml"))
    t = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    return daemon, t


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _since(pipeline: SlowPipeline, t0: float) -> list:
    return [(t, ids) for t, _, ids in list(pipeline.asked) if t >= t0]


def _first(pipeline: SlowPipeline, ids: tuple, t0: float) -> float:
    """Time of the first window after t0 asked exactly `ids`."""
    _wait(lambda: any(a == ids for _, a in _since(pipeline, t0)), 20, f"a window asked {ids}")
    return next(t for t, a in _since(pipeline, t0) if a == ids)


def test_daemon_sheds_on_a_hot_thermal_zone_and_resumes_below_the_resume_temperature(tmp_path, monkeypatch):
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "type").write_text("tj-thermal\n")
    temp = zone / "temp"
    temp.write_text("45000\n")
    pipeline = SlowPipeline(seconds_per_prompt=0.01)
    daemon, t = _run_daemon(
        tmp_path, monkeypatch, pipeline,
        scheduling={"shed_step_s": 0.5, "resume_step_s": 1.0,
                    "thermal": {"zones": str(tmp_path / "thermal_zone*"), "shed_above_c": 80, "resume_below_c": 70,
                                "interval_s": 0},
                    "load": {"enabled": False}})
    every, both, top = ("det", "cnt", "cap"), ("det", "cnt"), ("det",)
    try:
        t0 = time.monotonic()
        _wait(lambda: sum(a == every for _, a in _since(pipeline, t0)) >= 3, 20, "three windows with every prompt")

        hot = time.monotonic()
        temp.write_text("90000\n")  # 90 C: the caption first, then the count; the detection stays
        t_both = _first(pipeline, both, hot)
        t_top = _first(pipeline, top, hot)
        assert t_top - t_both >= 0.5 - 0.05  # one level per shed_step_s
        seen = [a for _, a in _since(pipeline, hot)]
        assert all("det" in a for a in seen)
        assert seen[seen.index(both):seen.index(top)] == [both] * (seen.index(top) - seen.index(both))

        warm = time.monotonic()
        temp.write_text("75000\n")  # below shed_above_c but not below resume_below_c: nothing comes back
        time.sleep(1.6)  # longer than resume_step_s
        assert {a for _, a in _since(pipeline, warm + 0.3)} == {top}

        cool = time.monotonic()
        temp.write_text("60000\n")  # below resume_below_c: the count, then (resume_step_s later) the caption
        t_back1 = _first(pipeline, both, cool)
        t_back2 = _first(pipeline, every, cool)
        assert t_back2 - t_back1 >= 1.0 - 0.05
        assert next(a for _, a in _since(pipeline, cool) if a != top) == both

        h = daemon.health()["scheduling"]
        assert h["level"] == 0 and h["shed_steps"] == 2 and h["resume_steps"] == 2
        assert set(h["skipped"]) == {"cnt", "cap"} and h["skipped"]["cap"] > h["skipped"]["cnt"] > 0
        asked_cap = sum("cap" in a for _, _, a in pipeline.asked)
        cut = sum(1 for _ in pipeline.asked)
        assert asked_cap + h["skipped"]["cap"] == cut  # every window either asked the caption or counted its skip
        assert h["temperature_c"] == 60.0
    finally:
        daemon.stop()
        t.join(30)
    assert not t.is_alive()


def test_daemon_sheds_when_a_slow_engine_falls_behind_real_time(tmp_path, monkeypatch):
    # 3 prompts x 0.1 s = 0.3 s per 0.2 s window: behind (real-time factor 1.5). Without the caption, 0.2 s: still
    # at the edge, so the count goes too; at 0.1 s per window (0.5) the device keeps up and holds there.
    pipeline = SlowPipeline(seconds_per_prompt=0.1)
    daemon, t = _run_daemon(
        tmp_path, monkeypatch, pipeline,
        scheduling={"shed_step_s": 0.5, "resume_step_s": 1.0, "thermal": {"enabled": False},
                    "load": {"shed_rtf": 0.95, "resume_rtf": 0.6, "shed_pending": 4, "resume_pending": 1}})
    try:
        t0 = time.monotonic()
        _wait(lambda: any(a == ("det",) for _, a in _since(pipeline, t0)), 30, "shedding down to the detection")
        seen = [a for _, a in _since(pipeline, t0)]
        assert seen[0] == ("det", "cnt", "cap") and all("det" in a for a in seen)
        h = daemon.health()["scheduling"]
        assert h["level"] == 2 and h["skipped"]["cap"] >= 1 and h["skipped"]["cnt"] >= 1
        assert "real-time factor" in h["reason"] or "windows waiting" in h["reason"]

        fast = time.monotonic()
        pipeline.seconds_per_prompt = 0.005  # the engine is fast again (a cooler GPU clock): both come back
        _wait(lambda: any(a == ("det", "cnt", "cap") for _, a in _since(pipeline, fast)), 30, "all prompts back")
        assert daemon.health()["scheduling"]["resume_steps"] == 2
    finally:
        daemon.stop()
        t.join(30)
    assert not t.is_alive()


def test_privacy_prompt_keeps_clips_and_withholds_events(tmp_path, monkeypatch):
    pipeline = SlowPipeline(seconds_per_prompt=0.0)
    daemon, t = _run_daemon(
        tmp_path, monkeypatch, pipeline,
        source={"type": "file", "file": {"path": "a.wav", "realtime": False}},  # 2 s: 10 windows, then the end
        prompts=[{"id": "speech", "kind": "yes_no", "text": "Is there human speech?"},
                 {"id": "det", "kind": "yes_no", "text": "Crow?"},
                 {"id": "cnt", "kind": "count", "text": "How many?"}],
        privacy={"prompt_id": "speech", "withhold_events": True},
        clips={"enabled": True}, embeddings={"enabled": True})
    try:
        _wait(lambda: daemon.counters.processed >= 10, 20, "ten windows")
        h = daemon.health()
    finally:
        daemon.stop()
        t.join(30)
    # Every window had speech: no clip, no embedding, and only the speech events went to the outbox.
    assert h["privacy"] == {"windows": 10, "clips_withheld": 10, "embeddings_withheld": 10, "events_withheld": 20}
    assert h["events"] == 10 and h.get("clips_saved") == 0 and h.get("embeddings_saved") == 0
    assert not list((tmp_path / "state" / "clips").glob("*.flac"))


def test_privacy_negative_windows_save_clips(tmp_path, monkeypatch):
    pipeline = SlowPipeline(no={"speech"})
    daemon, t = _run_daemon(
        tmp_path, monkeypatch, pipeline,
        source={"type": "file", "file": {"path": "a.wav", "realtime": False}},
        prompts=[{"id": "speech", "kind": "yes_no", "text": "Is there human speech?"},
                 {"id": "det", "kind": "yes_no", "text": "Crow?"}],
        privacy={"prompt_id": "speech", "withhold_events": True}, clips={"enabled": True})
    try:
        _wait(lambda: daemon.counters.processed >= 10, 20, "ten windows")
        h = daemon.health()
    finally:
        daemon.stop()
        t.join(30)
    assert h["privacy"]["windows"] == 0 and h["events"] == 20 and h["clips_saved"] == 10


def test_all_prompts_out_of_hours_skip_the_model(tmp_path, monkeypatch):
    now = datetime.now().astimezone()
    off = f"{(now + timedelta(hours=2)):%H}:00-{(now + timedelta(hours=3)):%H}:00"
    pipeline = SlowPipeline()
    daemon, t = _run_daemon(
        tmp_path, monkeypatch, pipeline,
        source={"type": "file", "file": {"path": "a.wav", "realtime": False}},
        prompts=[{"id": "owl", "kind": "yes_no", "text": "Owl?", "active_hours": off}])
    try:
        _wait(lambda: daemon.counters.idle >= 10, 20, "ten idle windows")
        h = daemon.health()
    finally:
        daemon.stop()
        t.join(30)
    assert pipeline.asked == [] and h["windows_idle"] == 10 and h["scheduling"]["off_schedule"] == {"owl": 10}
