"""The project's own error types.

Every error a user can cause (a bad file, a wrong key, a broken bundle) is one of these, raised with a one-line message
that names the culprit. The CLI prints the message and exits non-zero without a traceback; anything else is a bug and
keeps its traceback.
"""


class NatureLMEdgeError(Exception):
    """Base class: a user-facing problem with a clear one-line message."""


class ConfigError(NatureLMEdgeError):
    """A configuration file or a model config.json is missing, malformed, or contradicts the architecture."""


class CheckpointError(NatureLMEdgeError):
    """A checkpoint is missing keys, has unexpected keys, or has tensors of the wrong shape."""


class AudioError(NatureLMEdgeError):
    """Audio that cannot be used: unreadable, empty, all-NaN, too short."""


class BundleError(NatureLMEdgeError):
    """A model bundle whose manifest or file hashes do not check out."""


class ProviderError(NatureLMEdgeError):
    """An inference provider (TensorRT, CUDA) that was asked for and is not available."""


def show_value(value) -> str:
    """A user's value as error messages quote it: repr, cut to 60 characters (a message stays one readable line)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."
