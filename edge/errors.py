"""The project's own error types.

Every error a user can cause (a bad file, a wrong key, a broken bundle) is one of these, raised with a one-line message
that names the culprit. The CLI prints the message and exits non-zero without a traceback; anything else is a bug and
keeps its traceback.
"""


#: Exit statuses of the CLI (sysexits.h where one fits), documented in systemd/README.md: 2 is a bad configuration
#: or input (fix the file), 74 an I/O error, 75 a temporary failure (a lock held by another process, a full disk:
#: systemd's Restart= is the retry), 77 no permission to write (a read-only or foreign-owned state directory).
EXIT_USAGE, EXIT_IOERR, EXIT_TEMPFAIL, EXIT_NOPERM = 2, 74, 75, 77


class NatureLMEdgeError(Exception):
    """Base class: a user-facing problem with a clear one-line message."""

    #: The CLI's exit status when this error ends a command.
    exit_code = EXIT_USAGE

    def lines(self) -> list[str]:
        """The message as the CLI prints it: one line per problem."""
        return str(self).splitlines() or [type(self).__name__]


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
