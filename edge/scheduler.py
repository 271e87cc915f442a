"""Which prompts a window gets: thermal- and load-aware shedding by priority, and daily active hours.

The inference worker asks `PromptScheduler.plan` before every window. The answer is the configured prompt list less
  - prompts outside their `active_hours` (a daily schedule in local time, e.g. owls only at night), and
  - the lowest-priority prompts while the device is shedding load.

Shedding works in levels over the distinct priorities of the prompt list: level 1 skips the lowest priority, level
2 the two lowest, and so on; the highest priority is never shed (the recorder's detections keep running, and a
device that is still too hot throttles in hardware), nor is the privacy prompt, whose answer guards what the window
may save. One step up is taken whenever there is *pressure* and the last step is at least `shed_step_s` old:

  thermal  the hottest configured zone is at or above `thermal.shed_above_c`;
  load     (paced sources only) `load.shed_pending` windows or more are waiting, or the real-time factor of the last
           windows (inference seconds per second of audio) is at or above `load.shed_rtf`.

One step down is taken when there is *relief* (every zone below `thermal.resume_below_c`, at most
`load.resume_pending` windows waiting and the recent real-time factor at or under `load.resume_rtf`) and the last
step is at least `resume_step_s` old. Between the two thresholds the level holds: two thresholds and a slower resume
keep a device near its limit from switching captions on and off with every reading. The window statistics restart
at every step, so each decision sees only windows run at the current level.

A source that is not paced (a file read as fast as possible, stdin) waits for the model and cannot fall behind real
time, so only heat sheds there.

Every shed or out-of-hours prompt that was due on a window is counted per prompt id for `health`.
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from edge.config import DEFAULT_THERMAL_ZONES, SchedulingConfig
from edge.events import WindowInfo
from edge.prompts import PromptSpec
from edge.thermal import read_zone_temperatures

logger = logging.getLogger(__name__)

#: Windows whose inference time makes the recent real-time factor. Enough to average over a caption asked every few
#: windows; few enough to notice a slowdown within a minute or two of audio.
RTF_WINDOWS = 8
#: Fewer windows than this since the last step give no real-time factor (one slow window is not a trend).
RTF_MIN_WINDOWS = 3


@dataclass(frozen=True)
class Plan:
    """What one window gets. `prompts` keeps the configured order; `full` is True when it is the whole list (the
    pipeline then needs no override)."""

    prompts: list
    shed: tuple  # ids of due prompts skipped to shed load
    off_schedule: tuple  # ids of due prompts outside their active hours
    level: int
    full: bool


class PromptScheduler:
    """Used by the inference worker only (plan, window_done); `health` may be read from any thread.

    `read_temperatures(zones)`: in the daemon, the cached sample of its ThermalReader (edge/thermal.py), the same
    values health reports, so that the inference thread never waits for a sensor."""

    def __init__(self, cfg: SchedulingConfig, hop_s: float, privacy_prompt: str | None = None,
                 clock=time.monotonic, read_temperatures=read_zone_temperatures):
        self.cfg = cfg
        self.hop_s = float(hop_s)
        self.privacy_prompt = privacy_prompt
        self._clock = clock
        self._read_temperatures = read_temperatures
        self._lock = threading.Lock()
        self.level = 0
        self.reason: str | None = None  # why the current level was entered
        self._last_step = -float("inf")
        self._busy: deque[float] = deque(maxlen=RTF_WINDOWS)
        self._temps: dict[str, float] = {}
        self._temps_read_at = -float("inf")
        self._warned_no_zones = False
        self.skipped: dict[str, int] = {}
        self.off_schedule: dict[str, int] = {}
        self.shed_steps = 0
        self.resume_steps = 0
        self._shed_ids: tuple = ()

    def configure(self, cfg: SchedulingConfig, privacy_prompt: str | None) -> None:
        """SIGHUP: new thresholds apply from the next window; the level and the counts carry on."""
        with self._lock:
            self.cfg, self.privacy_prompt = cfg, privacy_prompt
            self._temps_read_at = -float("inf")
            self._warned_no_zones = False

    # --- signals -----------------------------------------------------------------------------------------------------

    def temperature(self) -> float | None:
        """The hottest configured zone (read at most every thermal.interval_s), or None where none is readable."""
        t = self.cfg.thermal
        if not t.enabled:
            return None
        now = self._clock()
        if now - self._temps_read_at >= t.interval_s:
            self._temps_read_at = now
            self._temps = self._read_temperatures(t.zones)
            if not self._temps and not self._warned_no_zones:
                existing = [p for p in t.zones if glob.glob(p)]
                # The default zones are absent on many machines that are not boards (containers, VMs): say so
                # quietly; zones a user configured and that give nothing are worth a warning.
                level = logging.INFO if tuple(t.zones) == DEFAULT_THERMAL_ZONES else logging.WARNING
                logger.log(level, "thermal shedding is on but no temperature could be read from %s%s; it stays off "
                           "until one can", ", ".join(t.zones), "" if existing else " (nothing matches)")
                self._warned_no_zones = True
            elif self._temps:
                self._warned_no_zones = False
        return max(self._temps.values()) if self._temps else None

    def rtf(self) -> float | None:
        """Inference seconds per second of audio over the last windows since the last step; None with too few."""
        n = len(self._busy)
        if n < RTF_MIN_WINDOWS or self.hop_s <= 0:
            return None
        return sum(self._busy) / (n * self.hop_s)

    def _pressure(self, temp, rtf, pending: int, paced: bool) -> str | None:
        th, ld = self.cfg.thermal, self.cfg.load
        if temp is not None and temp >= th.shed_above_c:
            return f"temperature {temp:.1f} C >= {th.shed_above_c:g} C"
        if ld.enabled and paced:
            if pending >= ld.shed_pending:
                return f"{pending} windows waiting >= {ld.shed_pending}"
            if rtf is not None and rtf >= ld.shed_rtf:
                return f"real-time factor {rtf:.2f} >= {ld.shed_rtf:g}"
        return None

    def _relief(self, temp, rtf, pending: int, paced: bool) -> str | None:
        """Why one level may be resumed now, or None while any signal is above its resume threshold."""
        th, ld = self.cfg.thermal, self.cfg.load
        if temp is not None and temp >= th.resume_below_c:
            return None
        why = [] if temp is None else [f"temperature {temp:.1f} C < {th.resume_below_c:g} C"]
        if ld.enabled and paced:
            if pending > ld.resume_pending:
                return None
            if rtf is None:
                if self._load_is_cause():
                    return None  # shed for load: judge this level by its own windows first
            elif rtf > ld.resume_rtf:
                return None
            else:
                why.append(f"real-time factor {rtf:.2f} <= {ld.resume_rtf:g}")
        return "; ".join(why) or "no pressure"

    def _load_is_cause(self) -> bool:
        return self.reason is not None and not self.reason.startswith("temperature")

    # --- per window ------------------------------------------------------------------------------------------------

    @staticmethod
    def _tiers(prompts) -> list[int]:
        return sorted({p.priority for p in prompts})

    def plan(self, prompts: list[PromptSpec], window: WindowInfo, pending: int = 0, paced: bool = True) -> Plan:
        prompts = list(prompts)
        tiers = self._tiers(prompts)
        max_level = max(0, len(tiers) - 1)
        now = self._clock()
        temp = self.temperature()
        rtf = self.rtf()
        with self._lock:
            self.level = min(self.level, max_level)  # a reload may leave fewer priorities
            pressure = self._pressure(temp, rtf, pending, paced)
            if pressure is not None:
                if self.level < max_level and now - self._last_step >= self.cfg.shed_step_s:
                    self._step(+1, pressure, now, tiers, prompts)
            elif self.level > 0 and now - self._last_step >= self.cfg.resume_step_s:
                relief = self._relief(temp, rtf, pending, paced)
                if relief is not None:
                    self._step(-1, relief, now, tiers, prompts)
            cutoff = tiers[self.level - 1] if self.level > 0 else None  # priorities <= cutoff are shed
            chosen, shed, off = [], [], []
            for p in prompts:
                due = p.due(window.index)
                if cutoff is not None and p.priority <= cutoff and p.id != self.privacy_prompt:
                    if due:
                        shed.append(p.id)
                        self.skipped[p.id] = self.skipped.get(p.id, 0) + 1
                    continue
                if not p.active_at(window.start_utc):
                    if due:
                        off.append(p.id)
                        self.off_schedule[p.id] = self.off_schedule.get(p.id, 0) + 1
                    continue
                chosen.append(p)
            self._shed_ids = tuple(p.id for p in prompts if cutoff is not None and p.priority <= cutoff
                                   and p.id != self.privacy_prompt)
        return Plan(prompts=chosen, shed=tuple(shed), off_schedule=tuple(off), level=self.level,
                    full=len(chosen) == len(prompts))

    def _step(self, direction: int, why: str, now: float, tiers: list[int], prompts) -> None:
        old = self.level
        self.level += direction
        self._last_step = now
        self._busy.clear()  # judge the new level by its own windows
        if direction > 0:
            self.shed_steps += 1
            self.reason = why
            ids = [p.id for p in prompts if p.priority == tiers[old] and p.id != self.privacy_prompt]
            logger.warning("shedding prompts of priority %d (%s): %s; level %d of %d", tiers[old],
                           ", ".join(ids) or "none", why, self.level, len(tiers) - 1)
        else:
            self.resume_steps += 1
            ids = [p.id for p in prompts if p.priority == tiers[self.level] and p.id != self.privacy_prompt]
            logger.info("resuming prompts of priority %d (%s): %s; level %d", tiers[self.level], ", ".join(ids) or
                        "none", why, self.level)
            if self.level == 0:
                self.reason = None

    def window_done(self, busy_s: float) -> None:
        """The inference worker spent `busy_s` on a window (gated windows included: they are real time too)."""
        with self._lock:
            self._busy.append(max(0.0, float(busy_s)))

    def health(self) -> dict:
        with self._lock:
            rtf = self.rtf()
            return {
                "level": self.level,
                "reason": self.reason,
                "shed": list(self._shed_ids),
                "skipped": dict(self.skipped),
                "off_schedule": dict(self.off_schedule),
                "shed_steps": self.shed_steps,
                "resume_steps": self.resume_steps,
                "temperature_c": max(self._temps.values()) if self._temps else None,
                "rtf_recent": None if rtf is None else round(rtf, 4),
            }


__all__ = ["Plan", "PromptScheduler", "read_zone_temperatures"]
