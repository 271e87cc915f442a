"""Why the device is not fully well, while it still runs: the one place every part of the daemon reports it.

A daemon that keeps recording with a problem (no audio since T, a GPU board fell back to the CPU, an encoder whose
accuracy was accepted below tolerance, windows failing in a row) must say so where a person looks: the retained
status topic turns from `online` to `degraded`, a retained `{prefix}/{device_id}/degraded` message carries the
reasons, and health carries them too. Each reason has a stable key (`no_audio`, `gpu_fallback`, `encoder_accuracy`,
`windows_failing`, ...) so that a dashboard can make one entity per kind of problem, and a reason clears itself by
key when the problem goes away.

Thread-safe: any thread sets or clears; `on_change` is called (outside the lock) with the new snapshot so that the
MQTT link can republish the retained status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

ONLINE, DEGRADED = "online", "degraded"


class DegradedState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, dict] = {}
        #: Called with snapshot() after every change; the daemon points it at the MQTT link.
        self.on_change: Callable[[dict], None] = lambda snapshot: None

    def set(self, key: str, reason: str) -> bool:
        """Raise (or update the text of) one reason; True when something changed."""
        with self._lock:
            old = self._reasons.get(key)
            if old is not None and old["reason"] == reason:
                return False
            since = old["since"] if old is not None else _utc_now()
            self._reasons[key] = {"reason": reason, "since": since, "since_monotonic": time.monotonic()}
            snap = self._snapshot_locked()
        self.on_change(snap)
        return True

    def clear(self, key: str) -> bool:
        with self._lock:
            if self._reasons.pop(key, None) is None:
                return False
            snap = self._snapshot_locked()
        self.on_change(snap)
        return True

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._reasons

    def reasons(self) -> dict[str, str]:
        with self._lock:
            return {k: v["reason"] for k, v in self._reasons.items()}

    @property
    def status(self) -> str:
        with self._lock:
            return DEGRADED if self._reasons else ONLINE

    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict:
        return {
            "status": DEGRADED if self._reasons else ONLINE,
            "reasons": {k: {"reason": v["reason"], "since": v["since"]} for k, v in sorted(self._reasons.items())},
        }


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
