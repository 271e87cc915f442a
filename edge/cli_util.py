"""Small helpers shared by the subcommand modules."""

from __future__ import annotations

import importlib.util

from edge.errors import NatureLMEdgeError

WORKSTATION_HINT = "this command runs on the workstation and needs the export extra: pip install 'naturelm-edge[export]'"


def workstation_missing() -> str | None:
    """The first workstation package that is not installed, or None. Looked up, not imported: the device path must
    never load torch, even to check for it."""
    for name in ("torch", "transformers", "onnx", "gguf"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def require_workstation() -> None:
    """Fail with one clear line, not an ImportError traceback, when the export extra is not installed."""
    missing = workstation_missing()
    if missing:
        raise NatureLMEdgeError(f"{missing} is not installed; {WORKSTATION_HINT}")
