"""The outbox drainer: moves events from the durable outbox to the MQTT link, and removes each one only when the
broker has acknowledged it.

At most `max_inflight` events are unacknowledged at a time, and nothing is handed to paho while the link is down, so
paho's in-memory queue stays small and the outbox on disk is the one place a backlog lives. Events in flight when the
link drops stay in paho, which resends them with the same message id after it reconnects; their acknowledgements
then remove them here. After a restart, everything left in the outbox is sent again: delivery is at least once, and
subscribers de-duplicate on `event_id`.

Lateness is stamped here, at publish time, because only here is it known: `published` (UTC now), `age_s` (from the
end of the event's window), `replayed` (the event was already in the outbox when this connection came up: it waited
through an outage or a restart) and `late` (age_s above `max_live_age_s`; live consumers should not treat it as
happening now). A redelivery by paho after a reconnect carries the stamp of its first attempt.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from datetime import datetime, timezone

from edge.events import utc_iso
from edge.mqtt import MqttLink
from edge.outbox import Outbox, OutboxError

logger = logging.getLogger(__name__)


class OutboxDrainer:
    def __init__(self, outbox: Outbox, link: MqttLink, max_inflight: int, max_live_age_s: float = 300.0):
        self.outbox, self.link = outbox, link
        self.max_live_age_s = float(max_live_age_s)
        self._replay_below = 0  # seqs below this were stored before the current connection came up
        self.replayed = 0
        self.late = 0
        self.max_inflight = max(1, int(max_inflight))
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._last_sent = -1  # highest seq handed to paho in this run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0  # acknowledged by the broker, this run
        self._acked: list[int] = []  # acknowledged, not yet removed (the outbox could not be written)
        self._fault: str | None = None  # the outbox error being retried, logged once
        link.on_activity = outbox.changed.set
        link.on_connected = self._mark_backlog

    def _mark_backlog(self) -> None:
        self._replay_below = self.outbox.next_seq

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-drainer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.outbox.changed.wait(0.5)
            self.outbox.changed.clear()
            try:
                self.step()
            except OutboxError as e:  # a lock or a full disk: said once, retried until it clears
                if str(e) != self._fault:
                    logger.warning("outbox drainer: %s; retrying", e)
                    self._fault = str(e)
                self._stop.wait(1.0)
                continue
            except Exception:  # a bug must not silently end delivery; log it and keep going
                logger.exception("outbox drainer step failed; retrying")
                self._stop.wait(1.0)
                continue
            if self._fault is not None:
                logger.info("outbox drainer: the outbox is writable again")
                self._fault = None

    def step(self) -> None:
        """Remove what was acknowledged, then send what fits in the in-flight window."""
        done = []
        while True:
            try:
                mid = self.link.acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is not None:
                done.append(seq)
        if done or self._acked:
            done, self._acked = self._acked + done, self._acked + done
            self.outbox.remove(done)  # on OutboxError they stay in _acked for the next step
            self._acked = []
            self.published += len(done)
        if not self.link.connected.is_set():
            return
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for seq, payload in self.outbox.peek(room, after_seq=self._last_sent):
            mid = self.link.publish_event(self._stamp(seq, payload))
            if mid is None:
                break
            self._inflight[mid] = seq
            self._last_sent = seq

    def _stamp(self, seq: int, payload: str) -> str:
        try:
            event = json.loads(payload)
            end = datetime.strptime(event["window"]["end"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("event seq %d: cannot read its window end (%s); published without lateness fields", seq, e)
            return payload
        now = datetime.now(timezone.utc)
        age = (now - end).total_seconds()
        event["published"] = utc_iso(now)
        event["age_s"] = round(age, 3)
        event["replayed"] = seq < self._replay_below
        event["late"] = age > self.max_live_age_s
        self.replayed += event["replayed"]
        self.late += event["late"]
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def flush(self, timeout: float) -> bool:
        """Wait (shutdown) until the outbox is empty or `timeout` passes. True when everything was delivered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.depth == 0:
                return True
            self.outbox.changed.set()
            time.sleep(0.05)
        return self.outbox.depth == 0

    def stop(self) -> None:
        self._stop.set()
        self.outbox.changed.set()
        if self._thread is not None:
            self._thread.join(5.0)
