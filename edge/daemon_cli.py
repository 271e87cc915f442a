"""Device subcommands of the field daemon: `run`, `check-config`, `devices`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from edge.daemon import run_daemon

    return run_daemon(Path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem, one line each: first the file's own (all of them: edge/config.py collects), then, for a file
    that validates, what it points at (the password, a file source's audio, the bundle's manifest and sizes)."""
    from edge.bundle import load_bundle
    from edge.config import load_config, read_mqtt_password
    from edge.errors import ConfigError, NatureLMEdgeError
    from edge.sources import probe_source

    cfg = load_config(Path(args.config))  # raises every problem of the file at once
    problems: list[str] = []
    m = cfg.mqtt
    password = "none"
    if m.password_credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY"):
        password = f"credential {m.password_credential!r} is read at run time from $CREDENTIALS_DIRECTORY (not checked)"
    else:
        try:
            password = "readable" if read_mqtt_password(m, str(cfg.path)) is not None else "none"
        except NatureLMEdgeError as e:
            problems += e.lines()
    try:
        probe_source(cfg.source)  # a file that is not audio is refused here, not retried by the daemon
    except NatureLMEdgeError as e:
        problems.append(f"{cfg.path}: source.file.path: {e}")
    bundle = None
    try:
        # Sizes only: hashing a multi-GB bundle is the daemon's job at start-up (bundle.verify).
        bundle = load_bundle(cfg.bundle.path, verify="size")
    except NatureLMEdgeError as e:
        problems.append(f"{cfg.path}: bundle.path: {e}")
    if problems:
        raise ConfigError("\n".join(problems))
    print(f"{cfg.path}: OK")
    print(f"  {cfg.summary()}")
    print(f"  bundle {bundle.bundle_id}: {len(bundle.manifest.get('files', {}))} file(s), sizes match; "
          f"mqtt password: {password}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from edge.sources import format_devices, input_devices

    print(format_devices(input_devices()))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run the field daemon: microphone/file/stdin -> model -> MQTT (systemd: Type=notify)",
        description=(
            "Capture audio, cut it into windows, ask the configured prompts of every window and publish the answers "
            "over MQTT at QoS 1 through a durable outbox. Signals: SIGTERM stops gracefully, SIGHUP reloads the "
            "prompts and the gate threshold. Under systemd it reports READY once the model is warm and pings the "
            "watchdog only while windows complete (a missing microphone is a degraded status, not a restart). Exit "
            "status: 2 configuration or input refused, 75 outbox locked or disk full, 77 outbox not writable, "
            "74 other I/O error (systemd/README.md)."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE", help="daemon configuration (YAML; see examples/daemon.yaml)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check-config",
        help="validate a daemon configuration and exit (0: valid, 2: every problem, one line each, named by key path)",
        description="Validate a daemon configuration (keys, types, values, referenced files, prompts, a file "
                    "source's audio, the bundle's manifest and file sizes) without starting anything. Every problem "
                    "is reported, one line each, not only the first.",
    )
    p.add_argument("config", metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("devices", help="list audio input devices (index, channels, native rate, name)",
                       description="List PortAudio input devices, for source.mic.device (an index or part of a name).")
    p.set_defaults(func=cmd_devices)
