"""An optional Prometheus endpoint for fleet dashboards (Grafana): the health report's numbers as metrics.

Off unless `metrics.enabled`, and then it needs the optional extra (`pip install naturelm-edge[metrics]`, which
brings prometheus_client); the device never needs it otherwise. It listens on `metrics.bind`, 127.0.0.1 by default
(this machine only: a Prometheus on the recorder, or one that scrapes through an SSH/VPN tunnel). Bound to a wider
address, anyone who can reach it reads the recorder's health (no secrets, but the fleet's layout and state); there
is no authentication here.

A scrape reads the last health report (published every `health.interval_s`) rather than computing a new one: the
report's real-time factor covers the interval since the previous report, and a scrape must not reset it.
"""

from __future__ import annotations

import logging

from edge.config import EndpointConfig
from edge.errors import ConfigError

logger = logging.getLogger(__name__)

#: health key -> (metric name, help, kind); kind "counter" for totals since the start.
_SIMPLE = {
    "uptime_s": ("uptime_seconds", "seconds since the daemon started", "gauge"),
    "rtf": ("real_time_factor", "inference seconds per second of audio over the last health interval", "gauge"),
    "outbox_depth": ("outbox_depth", "events waiting in the outbox for the broker", "gauge"),
    "outbox_bytes": ("outbox_bytes", "bytes of events waiting in the outbox", "gauge"),
    "outbox_dropped": ("outbox_dropped", "events dropped by the outbox's bounds", "counter"),
    "windows_processed": ("windows_processed", "windows run through the model", "counter"),
    "windows_gated": ("windows_gated", "windows too quiet for the model", "counter"),
    "windows_failed": ("windows_failed", "windows whose processing failed", "counter"),
    "windows_dropped": ("windows_dropped", "windows dropped because inference fell behind", "counter"),
    "windows_pending": ("windows_pending", "windows waiting for the model", "gauge"),
    "events": ("events", "events made", "counter"),
    "events_published": ("events_published", "events acknowledged by the broker", "counter"),
    "overruns": ("ring_overruns", "ring buffer overruns", "counter"),
    "source_gaps": ("source_gaps", "gaps in the audio source", "counter"),
    "temperature_max_c": ("temperature_max_celsius", "hottest thermal zone", "gauge"),
    "disk_free_bytes": ("disk_free_bytes", "free bytes on the state directory's file system", "gauge"),
    "rss_bytes": ("resident_memory_bytes", "resident memory of the daemon", "gauge"),
}


class HealthCollector:
    """A prometheus_client collector over the daemon's last health report (`source()` returns it, or None)."""

    def __init__(self, source, device_id: str):
        self.source, self.device_id = source, device_id

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        h = self.source()
        if not h:
            return
        dev = [self.device_id]
        for key, (name, doc, kind) in _SIMPLE.items():
            v = h.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                    f"naturelm_edge_{name}", doc, labels=["device_id"])
                fam.add_metric(dev, float(v))
                yield fam
        mqtt = h.get("mqtt") or {}
        up = GaugeMetricFamily("naturelm_edge_mqtt_connected", "1 while connected to the broker", labels=["device_id"])
        up.add_metric(dev, 1.0 if mqtt.get("connected") else 0.0)
        yield up
        temps = GaugeMetricFamily("naturelm_edge_temperature_celsius", "thermal zones", labels=["device_id", "zone"])
        for zone, t in (h.get("temperatures_c") or {}).items():
            temps.add_metric([self.device_id, zone], float(t))
        yield temps
        deg = GaugeMetricFamily("naturelm_edge_degraded", "1 while the degraded reason is raised",
                                labels=["device_id", "key"])
        for key in ((h.get("degraded") or {}).get("reasons") or {}):
            deg.add_metric([self.device_id, key], 1.0)
        yield deg
        det = h.get("detections") or {}
        if det:
            g = GaugeMetricFamily("naturelm_edge_detections_open", "detections in progress", labels=["device_id"])
            g.add_metric(dev, float(det.get("open", 0)))
            yield g
            c = CounterMetricFamily("naturelm_edge_detections_started", "detections started", labels=["device_id"])
            c.add_metric(dev, float(det.get("started", 0)))
            yield c


class MetricsServer:
    def __init__(self, cfg: EndpointConfig, source, device_id: str, origin: str = "config"):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ConfigError(f"{origin}: metrics.enabled: needs prometheus_client, the optional extra: "
                              "pip install 'naturelm-edge[metrics]'") from None
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.registry.register(HealthCollector(source, device_id))
        try:
            self.httpd, self._thread = start_http_server(cfg.port, addr=cfg.bind, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"{origin}: metrics.port: cannot listen on {cfg.bind}:{cfg.port} ({e.strerror})") from None
        self.port = self.httpd.server_address[1]
        logger.info("Prometheus metrics on http://%s:%d/metrics (%s)", cfg.bind, self.port,
                    "this machine only" if cfg.bind in ("127.0.0.1", "::1", "localhost")
                    else "reachable from the network: no authentication")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["HealthCollector", "MetricsServer"]
