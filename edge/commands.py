"""Device subcommands (torch-free)."""

from __future__ import annotations


def register(sub) -> None:
    """Adds the device-side subcommands to the CLI."""
