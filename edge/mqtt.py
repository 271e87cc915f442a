"""The MQTT link: one paho client (2.x, callback API version 2) with a status topic and last will, QoS 1 events whose
acknowledgements are handed to the outbox drainer, periodic health, and optional Home Assistant discovery.

Topics (`{prefix}/{device_id}/...`):
  status   retained: `online` once connected, `degraded` while the daemon runs with a problem (edge/degraded.py),
           `offline` as the last will (the broker publishes it when the device vanishes), `stopped` on a clean exit.
  degraded retained JSON {"status", "reasons": {key: {"reason", "since"}}}: why the status is `degraded` (empty
           reasons when it is not); republished whenever a reason is raised or cleared.
  events   one message per prompt answer, QoS 1 (edge/schemas/event.schema.json).
  health   retained, QoS 0, every health.interval_s.
  state/{prompt_id}
           retained, QoS 1: the prompt's detection lifecycle (edge/detections.py, edge/live.py), `state` ON/OFF;
           what Home Assistant entities read. Republished on connect and with every health report (so that an
           entity's expire_after only fires when the recorder is really gone); while disconnected only the latest
           state per prompt is kept: it is the current state that matters.
  set, set/result
           remote control (edge/remote.py), when enabled: commands in, one reply per command out.

The connection is run by this module's own network thread rather than paho's `loop_start`, because paho's built-in
reconnect swallows the reason a connection failed (refused, unreachable, TLS) and a field technician needs that line
in the log. The thread connects, runs paho's loop until the connection ends, and retries after a bounded exponential
backoff with jitter (a fleet that lost its broker must not reconnect in lockstep). A refused CONNACK (wrong password,
unknown user) is logged as an error with the broker's reason and retried the same way: the daemon keeps recording
into its outbox and never crash-loops over a credential. `connected` is set only by a successful CONNACK.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import random
import ssl
import threading
import time

import paho.mqtt.client as paho

from edge import __version__
from edge.config import MqttConfig, Secret
from edge.degraded import DegradedState

logger = logging.getLogger(__name__)

ONLINE, OFFLINE, STOPPED = "online", "offline", "stopped"

_AUTH_HINT = {
    "Not authorized": "check mqtt.username and the password",
    "Bad user name or password": "check mqtt.username and the password",
    "Client identifier not valid": "check mqtt.client_id",
}


class MqttLink:
    def __init__(self, cfg: MqttConfig, device_id: str, password: Secret | None = None,
                 degraded: DegradedState | None = None):
        self.cfg = cfg
        self.device_id = device_id
        self.base = base = f"{cfg.prefix}/{device_id}"
        self.status_topic, self.events_topic, self.health_topic = f"{base}/status", f"{base}/events", f"{base}/health"
        self.degraded_topic = f"{base}/degraded"
        #: The daemon's degraded reasons; the status topic says `degraded` while there is any.
        self.degraded = degraded if degraded is not None else DegradedState()
        self.degraded.on_change = self._on_degraded_change
        self.connected = threading.Event()
        #: mids the broker acknowledged (PUBACK); filled on paho's thread, emptied by the outbox drainer.
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        #: Called (no arguments) on connect and on every acknowledgement: the drainer's wake-up.
        self.on_activity = lambda: None
        self.connects = 0
        self.connect_failures = 0
        self.last_error: str | None = None
        self._failures_in_a_row = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._discovery_payloads: dict[str, str] = {}
        self._lock = threading.Lock()
        self._refused: str | None = None  # the broker's reason, when it refused this connection's CONNECT
        self._accepted = False  # this connection's CONNECT was accepted
        self._disconnect: tuple | None = None  # (number, text, who) of paho's last disconnect reason code
        self._socket_error: str | None = None  # the last socket error paho logged (it is not in any callback)
        #: Called (no arguments) on paho's thread when a connection is accepted, before anything is sent on it: the
        #: drainer marks what the outbox holds at that moment as replayed.
        self.on_connected = lambda: None
        self._states: dict[str, str] = {}  # prompt id -> latest retained state payload
        #: Live messages (notifications) made while disconnected: sent on reconnect if still young enough.
        self._live: collections.deque = collections.deque(maxlen=200)
        self.max_live_age_s = 300.0
        self.live_published = 0
        self.live_dropped_late = 0
        #: Remote control: set by edge/remote.py; None leaves the `set` topic unsubscribed.
        self.on_command = None
        self.expire_after_s: int | None = None  # Home Assistant expire_after of the entities (None: none)

        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=cfg.client_id or f"naturelm-edge-{device_id}",
                                  clean_session=True, protocol=paho.MQTTv311, reconnect_on_failure=False)
        self.client.max_inflight_messages_set(cfg.max_inflight)
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        if cfg.username:
            self.client.username_pw_set(cfg.username, password.reveal() if password else None)
        if cfg.tls is not None:
            t = cfg.tls
            self.client.tls_set(ca_certs=str(t.ca) if t.ca else None, certfile=str(t.cert) if t.cert else None,
                                keyfile=str(t.key) if t.key else None, cert_reqs=ssl.CERT_REQUIRED)
            if t.insecure:
                self.client.tls_insecure_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_log = self._on_log
        self.client.on_message = self._on_message
        self.set_topic, self.result_topic = f"{base}/set", f"{base}/set/result"

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    # --- network thread ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._network, name="mqtt", daemon=True)
        self._thread.start()

    def _next_delay(self) -> float:
        n = self._failures_in_a_row
        delay = min(self.cfg.reconnect_min_delay_s * 2 ** max(0, n - 1), self.cfg.reconnect_max_delay_s)
        return delay * random.uniform(0.8, 1.0)

    def _fail(self, message: str, level: int = logging.WARNING) -> None:
        self._failures_in_a_row += 1
        self.connect_failures += 1
        self.last_error = message
        delay = self._next_delay()
        logger.log(level, "%s; retrying in %.1f s (attempt %d)", message, delay, self._failures_in_a_row)
        self._stop.wait(delay)

    def _network(self) -> None:
        while not self._stop.is_set():
            self._refused = None
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            except (OSError, ValueError) as e:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError is an OSError)
                self._fail(f"cannot connect to MQTT broker {self.where}: {e}")
                continue
            self._disconnect = self._socket_error = None
            rc = None
            try:
                rc = self.client.loop_forever(retry_first_connection=False)
            except Exception:  # this thread is the only way out for months of events: it must not die
                logger.exception("MQTT network loop failed")
            # The loop ends when the connection does: a refused CONNACK, a dropped link, or our own disconnect.
            was_up, self._accepted = self._accepted, False
            self.connected.clear()
            if self._stop.is_set():
                break
            why = self._why(rc)
            if self._refused:
                self._fail(self._refused, logging.ERROR)
            elif was_up:
                self._failures_in_a_row = 0
                self._fail(f"lost the connection to MQTT broker {self.where}: {why}")
            else:
                self._fail(f"MQTT broker {self.where} closed the connection before accepting it: {why}")

    def _why(self, rc) -> str:
        """Why a connection ended, in paho's own words: the disconnect reason code (number and text) and, where that
        is paho's catch-all "Unspecified error", the network loop's error code and text and the socket error paho
        logged. The reason code alone says nothing useful for a connection the broker dropped."""
        parts = []
        specific = self._disconnect is not None and self._disconnect[0] not in (0, 128)
        if not specific:
            if rc is not None and rc != paho.MQTT_ERR_SUCCESS:
                name = getattr(rc, "name", None) or str(rc)
                parts.append(f"{paho.error_string(rc).rstrip('.')} ({name}, rc {int(rc)})")
            if self._socket_error:
                parts.append(self._socket_error)
            elif rc == paho.MQTT_ERR_CONN_LOST:
                parts.append("the broker closed the socket")
        if self._disconnect is not None:
            value, text, sender = self._disconnect
            parts.append(f"reason code {value} {text} ({sender})")
            if text == "Keep alive timeout":
                parts.append(f"no answer from the broker within keepalive_s ({self.cfg.keepalive_s} s)")
        return "; ".join(parts) or "no reason given"

    # --- paho callbacks (paho's thread) ---------------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            hint = _AUTH_HINT.get(str(reason_code))
            self._refused = (f"MQTT broker {self.where} refused the connection: {reason_code}"
                             + (f" ({hint})" if hint else ""))
            return  # paho closes the socket; `connected` stays clear
        self._refused = None
        self._accepted = True
        self._failures_in_a_row = 0
        self.connects += 1
        self.last_error = None
        logger.info("connected to MQTT broker %s as %s%s", self.where, self.cfg.client_id or
                    f"naturelm-edge-{self.device_id}", " (reconnect)" if self.connects > 1 else "")
        try:
            self.on_connected()
        except Exception:  # a hook's bug must not cost the connection
            logger.exception("on_connected hook failed")
        self._publish_status(client)
        self._send_discovery()
        self._send_states(client)
        self._send_live(client)
        if self.on_command is not None:
            client.subscribe(self.set_topic, qos=1)
        self.connected.set()
        self.on_activity()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        # Logged by the network loop once it has returned, with paho's error code (the reason code alone is
        # "Unspecified error" for most network failures).
        sender = "sent by the broker" if getattr(flags, "is_disconnect_packet_from_server", False) else "client side"
        self._disconnect = (getattr(reason_code, "value", reason_code), str(reason_code), sender)
        logger.debug("MQTT on_disconnect: %s", self._disconnect)
        self.connected.clear()

    def _on_log(self, client, userdata, level, buf) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._socket_error = buf
            logger.debug("paho: %s", buf)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # paho holds its own message lock here: hand the mid over, touch nothing else.
        self.acks.put(mid)
        self.on_activity()

    # --- status -----------------------------------------------------------------------------------------------------

    def _publish_status(self, client=None) -> None:
        snap = self.degraded.snapshot()
        client = client or self.client
        client.publish(self.status_topic, snap["status"], qos=1, retain=True)
        client.publish(self.degraded_topic, json.dumps(snap, separators=(",", ":")), qos=1, retain=True)

    def _on_degraded_change(self, snapshot: dict) -> None:
        reasons = "; ".join(f"{k}: {v['reason']}" for k, v in snapshot["reasons"].items())
        if snapshot["status"] == ONLINE:
            logger.info("status online: no problem left")
        else:
            logger.warning("status degraded: %s", reasons)
        if self.connected.is_set() and not self._stop.is_set():
            self._publish_status()

    # --- publishing -----------------------------------------------------------------------------------------------

    def publish_event(self, payload: str) -> int | None:
        """Publish one event at QoS 1; its mid, or None when it could not be queued (not connected)."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(self.events_topic, payload, qos=1)
        # NO_CONN: the link dropped during the call; paho keeps the message and sends it after reconnecting, so the
        # mid still stands and its acknowledgement will come.
        if info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return info.mid
        logger.warning("publish refused by the MQTT client: %s", paho.error_string(info.rc))
        return None

    def publish_health(self, health: dict) -> bool:
        if not self.connected.is_set():
            return False
        ok = self.client.publish(self.health_topic, json.dumps(health, separators=(",", ":")), qos=0,
                                 retain=True).rc == paho.MQTT_ERR_SUCCESS
        self._send_states()  # the entities' heartbeat: keeps expire_after from firing while the recorder lives
        return ok

    # --- per-prompt state, live messages --------------------------------------------------------------------------

    def state_topic(self, prompt_id: str) -> str:
        return f"{self.base}/state/{prompt_id}"

    def publish_state(self, prompt_id: str, state: dict) -> None:
        """The prompt's current detection state, retained. Kept, and sent on (re)connect, when not connected."""
        payload = json.dumps(state, separators=(",", ":"))
        with self._lock:
            self._states[prompt_id] = payload
        if self.connected.is_set():
            self.client.publish(self.state_topic(prompt_id), payload, qos=1, retain=True)

    def clear_state(self, prompt_id: str) -> None:
        """The prompt is gone: its retained state is deleted on the broker (an empty retained payload)."""
        with self._lock:
            self._states.pop(prompt_id, None)
        if self.connected.is_set():
            self.client.publish(self.state_topic(prompt_id), "", qos=1, retain=True)

    def _send_states(self, client=None) -> None:
        client = client or self.client
        with self._lock:
            items = list(self._states.items())
        for pid, payload in items:
            client.publish(self.state_topic(pid), payload, qos=1, retain=True)

    def publish_live(self, topic: str, payload: dict, made: float | None = None) -> None:
        """A live message (not retained, QoS 1): sent now, or on reconnect if by then it is not older than
        max_live_age_s (a notification an hour late is noise; the events topic has the record)."""
        made = time.time() if made is None else made
        with self._lock:
            self._live.append((topic, json.dumps(payload, separators=(",", ":")), made))
        if self.connected.is_set():
            self._send_live()

    def _send_live(self, client=None) -> None:
        client = client or self.client
        with self._lock:
            items, now = list(self._live), time.time()
            self._live.clear()
        for topic, payload, made in items:
            if now - made > self.max_live_age_s:
                self.live_dropped_late += 1
                logger.info("live message for %s is %.0f s old (limit %.0f s): not sent", topic, now - made,
                            self.max_live_age_s)
                continue
            client.publish(topic, payload, qos=1)
            self.live_published += 1

    # --- remote control ---------------------------------------------------------------------------------------------

    def _on_message(self, client, userdata, msg) -> None:
        handler = self.on_command
        if handler is None or msg.topic != self.set_topic:
            return
        try:
            handler(msg.payload)
        except Exception:  # a command must never take paho's thread down
            logger.exception("remote control handler failed on a message from %s", msg.topic)

    def publish_result(self, result: dict) -> None:
        if self.connected.is_set():
            self.client.publish(self.result_topic, json.dumps(result, separators=(",", ":")), qos=1)

    # --- Home Assistant discovery -----------------------------------------------------------------------------------

    def set_discovery(self, prompts) -> None:
        """Entities for Home Assistant, all on one device: health sensors (numeric, with state_class, unit and
        device_class where Home Assistant has one, so that it keeps long-term statistics and graphs them), one
        problem binary sensor per degraded key, and per yes_no/label prompt a detection binary sensor that reads the
        prompt's own retained state topic (ON while a detection lasts, OFF once it ended).

        Published retained on every connect; a prompt removed by a reload has its entity deleted (empty payload).
        Payloads are checked against Home Assistant's discovery schemas in tests/ha_discovery.py.
        """
        if not self.cfg.homeassistant_discovery:
            return
        payloads = discovery_payloads(self, prompts)
        with self._lock:
            removed = set(self._discovery_payloads) - set(payloads)
            self._discovery_payloads = {**payloads, **{t: "" for t in removed}}
        if self.connected.is_set():
            self._send_discovery()

    def _send_discovery(self) -> None:
        with self._lock:
            items = list(self._discovery_payloads.items())
            self._discovery_payloads = {t: p for t, p in items if p}
        for topic, payload in items:
            self.client.publish(topic, payload, qos=1, retain=True)

    # --- shutdown ---------------------------------------------------------------------------------------------------

    def stop(self, status: str = STOPPED, timeout: float = 5.0) -> None:
        """Publish `status` (retained), disconnect cleanly (so the broker does not send the will), end the thread."""
        self._stop.set()
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, status, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                logger.warning("could not publish the %s status: %s", status, e)
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)
        self.connected.clear()


#: Health sensors: (health key, name, unit, device_class, state_class). Home Assistant has no device class for a
#: ratio or a count of events, so those have a unit only; a state_class is what makes it keep statistics.
HEALTH_SENSORS = (
    ("uptime_s", "uptime", "s", "duration", "total_increasing"),
    ("rtf", "real-time factor", "s/s", None, "measurement"),
    ("outbox_depth", "outbox depth", "events", None, "measurement"),
    ("windows_dropped", "windows dropped", "windows", None, "total_increasing"),
    ("temperature_max_c", "temperature", "°C", "temperature", "measurement"),
    ("disk_free_bytes", "disk free", "B", "data_size", "measurement"),
)
#: Degraded keys (edge/degraded.py) with a problem entity each.
DEGRADED_ENTITIES = (("gpu_fallback", "GPU fallback"), ("no_audio", "no audio"),
                     ("windows_failing", "windows failing"), ("encoder_accuracy", "encoder accuracy"),
                     ("llm_offload", "LLM offload"))


def discovery_node(device_id: str) -> str:
    """The node id in discovery topics: Home Assistant allows only [a-zA-Z0-9_-] there, so dots become '_'."""
    return device_id.replace(".", "_")


def discovery_payloads(link: MqttLink, prompts) -> dict[str, str]:
    node = discovery_node(link.device_id)
    dp = link.cfg.discovery_prefix
    device = {"identifiers": [f"naturelm-edge-{node}"], "name": f"NatureLM {link.device_id}",
              "manufacturer": "naturelm-edge", "model": "NatureLM-audio edge recorder", "sw_version": __version__}
    origin = {"name": "naturelm-edge", "sw_version": __version__}
    availability = [{"topic": link.status_topic,
                     "value_template": "{{ 'online' if value in ('online', 'degraded') else 'offline' }}"}]
    common = {"availability": availability, "device": device, "origin": origin}
    if link.expire_after_s:
        common["expire_after"] = int(link.expire_after_s)
    payloads = {}
    for key, name, unit, cls, state_class in HEALTH_SENSORS:
        cfg = {"name": name, "unique_id": f"naturelm_{node}_{key}", "state_topic": link.health_topic,
               "value_template": f"{{{{ value_json.{key} }}}}", "entity_category": "diagnostic",
               "state_class": state_class, "unit_of_measurement": unit, **common}
        if cls:
            cfg["device_class"] = cls
        payloads[f"{dp}/sensor/{node}/{key}/config"] = json.dumps(cfg)
    for key, name in DEGRADED_ENTITIES:
        cfg = {"name": name, "unique_id": f"naturelm_{node}_degraded_{key}", "state_topic": link.degraded_topic,
               "value_template": f"{{{{ 'ON' if '{key}' in value_json.reasons else 'OFF' }}}}",
               "json_attributes_topic": link.degraded_topic,
               "json_attributes_template": f"{{{{ value_json.reasons.get('{key}', {{}}) | tojson }}}}",
               "device_class": "problem", "entity_category": "diagnostic",
               "availability": availability, "device": device, "origin": origin}
        payloads[f"{dp}/binary_sensor/{node}/degraded_{key}/config"] = json.dumps(cfg)
    for p in prompts:
        if p.kind not in ("yes_no", "label"):
            continue
        oid = p.id.replace(".", "_")
        topic = link.state_topic(p.id)
        cfg = {"name": p.id, "unique_id": f"naturelm_{node}_{oid}", "state_topic": topic,
               "value_template": "{{ value_json.state }}", "json_attributes_topic": topic, **common}
        payloads[f"{dp}/binary_sensor/{node}/{oid}/config"] = json.dumps(cfg)
    return payloads
