"""Exceptions that the CLI turns into one-line messages.

The library raises these for problems the *user* can fix (bad files, wrong shapes, missing
weights). The CLI prints ``error: <message>`` and exits with :attr:`UserError.exit_code`; any other
exception is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment. The message says what, where and how to fix."""

    exit_code = 1


class InputError(UserError, ValueError):
    """A bad input file or argument (missing, unreadable, wrong shape or values)."""


class MissingWeightsError(UserError, FileNotFoundError):
    """Model weights are not available locally and cannot be downloaded.

    Exit code 2, as documented. The message names the missing file and the download command.
    """

    exit_code = 2


class CheckpointError(UserError):
    """A weight file exists but is corrupt or does not match the expected keys and shapes."""

    exit_code = 2


def key_mismatch_error(source: str, missing=(), unexpected=(), wrong_shape=(),
                       hint: str = "is it the right file for this model?") -> CheckpointError:
    """The one message for weights whose keys or shapes differ from the model's: each kind's count and
    its first few names. ``source`` names the file (or the part of it) that was loaded."""

    def show(keys) -> str:
        keys = [str(k) for k in keys]
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = [f"{len(keys)} {label}: {show(keys)}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
             if keys]
    return CheckpointError(f"{source} does not match the model ({'; '.join(parts)}); {hint}")
