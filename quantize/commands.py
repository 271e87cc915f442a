"""Workstation subcommands for the language side (no torch import at module level)."""

from __future__ import annotations


def register(sub) -> None:
    """Adds the language-side subcommands (quantize) to the CLI."""
