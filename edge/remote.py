"""Remote control over MQTT: commands on `{prefix}/{device_id}/set`, one reply each on `{prefix}/{device_id}/set/result`.

Off unless `remote_control.enabled`; then only the actions in `remote_control.allow`, and prompt changes only on the
prompts in `remote_control.prompts` (never the privacy prompt: the config refuses it). Commands come only through the
broker this daemon authenticated to, on its own topic; who may publish there is the broker's ACL
(examples/mosquitto/acl). A bad or refused command is one logged line and a reply saying why, never a crash.

A command (JSON object):
    {"id": "any string, echoed", "action": "health"}
    {"id": "...", "action": "disable_prompt", "prompt_id": "owl"}
    {"id": "...", "action": "enable_prompt", "prompt_id": "owl"}
    {"id": "...", "action": "set_threshold", "prompt_id": "crow", "threshold": 0.7}
The reply: {"id", "action", "ok": true, "result": {...}} or {"id", "action", "ok": false, "error": "..."}.

Messages are checked on paho's thread and applied on the daemon's main loop (`process`), where configuration changes
already happen (SIGHUP), so the inference thread never sees prompts change under it. Changes last until the next
reload or restart, which go back to the configuration file.
"""

from __future__ import annotations

import json
import logging
import math
import queue
from dataclasses import replace

from edge.config import REMOTE_ACTIONS, RemoteControlConfig

logger = logging.getLogger(__name__)

_KEYS = {"health": set(), "disable_prompt": {"prompt_id"}, "enable_prompt": {"prompt_id"},
         "set_threshold": {"prompt_id", "threshold"}}
_MAX_PAYLOAD = 4096


class CommandError(ValueError):
    pass


def parse_command(raw: bytes, cfg: RemoteControlConfig) -> dict:
    """A checked command, or CommandError saying what is wrong (its `id` attribute: the command's id, if readable)."""
    if len(raw) > _MAX_PAYLOAD:
        raise CommandError(f"payload of {len(raw)} bytes is over the {_MAX_PAYLOAD}-byte limit")
    try:
        cmd = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CommandError(f"payload is not JSON ({e})") from None
    if not isinstance(cmd, dict):
        raise CommandError(f"payload must be a JSON object, got {type(cmd).__name__}")
    cid = cmd.get("id")
    if cid is not None and (not isinstance(cid, str) or len(cid) > 64):
        raise CommandError("id must be a string of at most 64 characters")
    def fail(msg):
        e = CommandError(msg)
        e.id = cid
        e.action = cmd.get("action") if isinstance(cmd.get("action"), str) else None
        return e

    action = cmd.get("action")
    if action not in REMOTE_ACTIONS:
        raise fail(f"action must be one of {', '.join(REMOTE_ACTIONS)}, got {json.dumps(action)[:80]}")
    if action not in cfg.allow:
        raise fail(f"action {action!r} is not allowed by this recorder's remote_control.allow")
    extra = set(cmd) - {"id", "action"} - _KEYS[action]
    if extra:
        raise fail(f"unknown key(s) for {action}: {', '.join(sorted(map(str, extra)))}")
    missing = _KEYS[action] - set(cmd)
    if missing:
        raise fail(f"{action} needs {', '.join(sorted(missing))}")
    if "prompt_id" in _KEYS[action]:
        pid = cmd["prompt_id"]
        if not isinstance(pid, str) or pid not in cfg.prompts:
            raise fail(f"prompt {json.dumps(pid)[:80]} may not be changed remotely (remote_control.prompts: "
                       f"{', '.join(cfg.prompts) or 'none'})")
    if action == "set_threshold":
        t = cmd["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not (
                cfg.threshold_min <= t <= cfg.threshold_max):
            raise fail(f"threshold must be a number {cfg.threshold_min:g}..{cfg.threshold_max:g}, got "
                       f"{json.dumps(t)[:40]}")
    return {"id": cid, **{k: cmd[k] for k in ("action", *_KEYS[action])}}


class RemoteControl:
    def __init__(self, cfg: RemoteControlConfig, link, daemon):
        self.cfg, self.link, self.daemon = cfg, link, daemon
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self.accepted = 0
        self.refused = 0
        #: prompt id -> the spec as configured, for the prompts disabled remotely (to enable them again)
        self.disabled: dict = {}
        link.on_command = self.on_message

    # paho's thread
    def on_message(self, raw: bytes) -> None:
        try:
            cmd = parse_command(raw, self.cfg)
        except CommandError as e:
            self.refused += 1
            logger.warning("remote control: refused a command on %s: %s", self.link.set_topic, e)
            self.link.publish_result({"id": getattr(e, "id", None), "action": getattr(e, "action", None),
                                      "ok": False, "error": str(e)})
            return
        self._pending.put(cmd)

    # the daemon's main loop
    def process(self) -> None:
        while True:
            try:
                cmd = self._pending.get_nowait()
            except queue.Empty:
                return
            try:
                result = self._apply(cmd)
            except CommandError as e:
                self.refused += 1
                logger.warning("remote control: %s refused: %s", cmd["action"], e)
                self.link.publish_result({"id": cmd["id"], "action": cmd["action"], "ok": False, "error": str(e)})
                continue
            self.accepted += 1
            logger.info("remote control: %s %s", cmd["action"], json.dumps(result))
            self.link.publish_result({"id": cmd["id"], "action": cmd["action"], "ok": True, "result": result})

    def reset(self) -> None:
        """A reload went back to the configuration file: forget what was changed remotely."""
        self.disabled.clear()

    def _apply(self, cmd: dict) -> dict:
        d = self.daemon
        action = cmd["action"]
        if action == "health":
            d.publish_health_now()
            return {"published": d.link.health_topic}
        prompts = list(d.cfg.prompts)
        pid = cmd["prompt_id"]
        current = next((p for p in prompts if p.id == pid), None)
        if action == "disable_prompt":
            if current is None:
                raise CommandError(f"prompt {pid!r} is already disabled")
            self.disabled[pid] = current
            prompts.remove(current)
        elif action == "enable_prompt":
            if current is not None:
                raise CommandError(f"prompt {pid!r} is already enabled")
            if pid not in self.disabled:
                raise CommandError(f"prompt {pid!r} is not in the running configuration")
            prompts.append(self.disabled.pop(pid))
        else:  # set_threshold
            if current is None:
                raise CommandError(f"prompt {pid!r} is disabled; enable it first")
            prompts[prompts.index(current)] = replace(current, threshold=float(cmd["threshold"]))
        d.apply_prompts(prompts)
        out = {"prompts": [p.id for p in prompts]}
        if action == "set_threshold":
            out["threshold"] = float(cmd["threshold"])
        return out


__all__ = ["CommandError", "RemoteControl", "parse_command"]
