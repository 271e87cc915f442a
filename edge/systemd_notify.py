"""sd_notify(3) without libsystemd: one datagram per state change to the socket named by $NOTIFY_SOCKET.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same from a shell. A socket path
starting with '@' is in Linux's abstract namespace (a leading NUL byte). A failed send is logged once and otherwise
ignored: the service manager being unreachable must never take the recorder down.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        if addr and not addr.startswith(("/", "\0")):
            logger.warning("ignoring NOTIFY_SOCKET %r: only unix socket paths are supported", addr)
            addr = None
        self._addr = addr
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_s = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """WatchdogSec= in seconds, when the watchdog is on for this process (sd_watchdog_enabled semantics)."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec:
            return None
        try:
            usec_i = int(usec)
            if pid and int(pid) != os.getpid():
                return None
        except ValueError:
            return None
        return usec_i / 1e6 if usec_i > 0 else None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, *fields: str) -> bool:
        """Send "KEY=VALUE" lines in one datagram. False when not under systemd or the send failed."""
        if self._addr is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode("utf-8"), self._addr)
            return True
        except OSError as e:
            if not self._warned:
                logger.warning("cannot notify systemd over %r: %s", self._addr.replace("\0", "@"), e)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
