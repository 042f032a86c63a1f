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
