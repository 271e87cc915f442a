"""Small helpers shared by the subcommand modules."""

from __future__ import annotations

from edge.errors import NatureLMEdgeError

WORKSTATION_HINT = "this command runs on the workstation and needs the export extra: pip install 'naturelm-edge[export]'"


def require_workstation() -> None:
    """Fail with one clear line, not an ImportError traceback, when the export extra is not installed."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise NatureLMEdgeError(f"{e.name} is not installed; {WORKSTATION_HINT}") from None
