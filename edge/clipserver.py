"""The clip server: the saved clips over HTTP, so that a dashboard can play the clip of a detection from the URL in its
event (`clip_url`).

Why HTTP on demand rather than clips pushed on an MQTT topic: a field recorder's uplink is often a metered cellular
or satellite link, and most clips are never listened to. Pushed, every positive window would cost its clip (a 10 s
clip at 48 kHz measured 900 kB as FLAC, 77 kB as Opus) whether anyone listens or not, and it would sit in the
broker's queues during outages ahead of the events. Served, a clip costs bytes only when someone presses play, and
then as Opus (`.opus`, transcoded on request, about a tenth of the FLAC) unless the FLAC itself is asked for.
docs/mqtt.md has the measurements.

Who can reach it: off unless `clip_server.enabled`; it listens on `clip_server.bind`, 127.0.0.1 by default (this
machine only: a reverse proxy or an SSH/VPN tunnel on the recorder decides who else). Bound to a wider address,
anyone who can reach that address and port can fetch every saved clip: there is no authentication here, so bind it
only to a network that is trusted (a site LAN, a VPN interface). Read-only: GET and HEAD of files in the clip
directory, by a strict name pattern; nothing else is served.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from edge.config import EndpointConfig

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^/clips/([A-Za-z0-9_.-]{1,128})\.(flac|opus)$")
#: Opus takes these rates only; a clip at another rate is resampled to the next one up.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def to_opus(flac: Path) -> bytes:
    """The clip as Ogg Opus (libsndfile's encoder, its default bitrate), resampled to a rate Opus takes."""
    import soundfile as sf
    import soxr

    audio, sr = sf.read(str(flac), dtype="float32", always_2d=False)
    rate = next((r for r in _OPUS_RATES if r >= sr), 48000)
    if rate != sr:
        audio = soxr.resample(audio, sr, rate)
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), rate, format="OGG", subtype="OPUS")
    return buf.getvalue()


def base_url(cfg: EndpointConfig) -> str:
    return (cfg.public_url or f"http://{cfg.bind}:{cfg.port}").rstrip("/")


def clip_url(cfg: EndpointConfig, clip_path: str, fmt: str = "opus") -> str:
    return f"{base_url(cfg)}/clips/{Path(clip_path).stem}.{fmt}"


class ClipServer:
    def __init__(self, cfg: EndpointConfig, clip_dir: Path):
        self.cfg, self.dir = cfg, Path(clip_dir).resolve()
        self.requests = 0
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "naturelm-edge-clips"

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head: bool):
                body, ctype = server.lookup(self.path)
                if body is None:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "max-age=86400")
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                    server.bytes_sent += len(body)
                server.requests += 1

            def log_message(self, fmt, *args):
                logger.debug("clip server: %s %s", self.address_string(), fmt % args)

        self.httpd = ThreadingHTTPServer((cfg.bind, cfg.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def lookup(self, path: str) -> tuple[bytes | None, str]:
        m = _NAME.match(path.split("?", 1)[0])
        if not m:
            return None, ""
        flac = (self.dir / f"{m.group(1)}.flac").resolve()
        if flac.parent != self.dir or not flac.is_file():
            return None, ""
        try:
            if m.group(2) == "flac":
                return flac.read_bytes(), "audio/flac"
            return to_opus(flac), "audio/ogg"
        except (OSError, RuntimeError, ValueError) as e:  # deleted by retention meanwhile, or unreadable
            logger.warning("clip server: cannot serve %s: %s", flac, e)
            return None, ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="clip-server", daemon=True)
        self._thread.start()
        logger.info("clip server on http://%s:%d/clips/ (%s)", self.cfg.bind, self.port,
                    "this machine only" if self.cfg.bind in ("127.0.0.1", "::1", "localhost")
                    else "reachable from the network: no authentication")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["ClipServer", "base_url", "clip_url", "to_opus"]
