"""A real mosquitto for integration tests, on a free port, and a paho subscriber that collects what it receives.

The broker runs from a generated config in a temporary folder (optionally with a password file made by
mosquitto_passwd, and with persistence so that a restart keeps the subscriber's session and its queued QoS 1 messages,
as a production broker does). It can be stopped, restarted on the same port, and paused with SIGSTOP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def have_mosquitto() -> bool:
    return os.access(MOSQUITTO, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, workdir: Path, users: dict[str, str] | None = None, persistence: bool = True,
                 tls: dict | None = None):
        """tls: {"ca", "cert", "key"} paths of the broker's CA, certificate and key; clients must then present a
        certificate signed by that CA."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        # As root, mosquitto drops to the `mosquitto` user, which cannot read files in a root-only tmp folder.
        lines = ["user root"] if os.geteuid() == 0 else []
        lines += [f"listener {self.port} 127.0.0.1"]
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
                      "require_certificate true"]
        lines += ["log_dest stderr", "log_type error", "log_type warning",
                 "log_type notice", "log_type information"]
        if users:
            pw = self.dir / "passwd"
            pw.touch()
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> Broker:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


class Subscriber:
    """Collects (topic, payload str, retain) from `topics` at QoS 1, with a persistent session (clean_session=False)
    so that messages published while it is disconnected (broker restart) are queued for it."""

    def __init__(self, port: int, topics: list[str], client_id: str = "test-subscriber",
                 username: str | None = None, password: str | None = None):
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, str, bool]] = []
        self._cond = threading.Condition()
        self._topics = topics
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscriber did not connect")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            for t in self._topics:
                client.subscribe(t, qos=1)
            self._subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((msg.topic, msg.payload.decode("utf-8", "replace"), bool(msg.retain)))
            self._cond.notify_all()

    def on(self, suffix: str) -> list[str]:
        with self._cond:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def events(self) -> list[dict]:
        return [json.loads(p) for p in self.on("/events")]

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "messages") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; got "
                                         f"{[(t, p[:80]) for t, p, _ in self.messages][-10:]}")
                self._cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA, a broker certificate for 127.0.0.1 and a client certificate, all signed by the CA (openssl CLI)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=naturelm-test-ca")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []))
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}
