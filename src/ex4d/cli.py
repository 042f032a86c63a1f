"""The ``ex4d`` command line: thin subcommands over the library.

Each subcommand lives in ``ex4d/commands/<name>.py`` and defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a callable taking the parsed args. Heavy imports (torch models,
moderngl) happen inside those callables so that ``ex4d --help`` is instant.

Errors: a :class:`ex4d.errors.UserError` prints one line ``error: ...`` and exits with its code
(1, or 2 for missing/corrupt weights). Anything else is a bug: one line plus a hint to rerun with
``--debug`` for the traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

#: Subcommand modules under ex4d.commands, in the order ``--help`` lists them.
COMMANDS = ["synth", "depth", "recon", "generate", "run", "convert", "make_pairs", "train", "batch", "eval", "stereo_pack", "app"]


class _Parser(argparse.ArgumentParser):
    """argparse with ex4d's error contract: a usage mistake is one line and exit 1 (exit 2 means missing
    weights here, not argparse's usage error)."""

    def error(self, message: str):
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ex4d",
        description="Re-film one video along a new camera path (EX-4D: depth -> DW-Mesh -> render -> Wan2.1 + adapter).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    parser.add_argument("--version", action="version", version=f"ex4d {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ex4d.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ex4d.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    for command_parser in sub.choices.values():
        # One meaning everywhere: replacing a file that ex4d did not write needs this switch (ex4d.io.files).
        command_parser.add_argument(
            "--overwrite", action="store_true",
            help="replace existing output files that ex4d did not write (default: refuse); inputs are never "
                 "overwritten")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ex4d")
    except PackageNotFoundError:
        return "unknown"


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or ``kill`` stopping the run), unwound like Ctrl-C so temporaries are removed."""


def _terminate_like_ctrl_c() -> None:
    import signal
    import threading

    def handler(signum, frame):
        raise _Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    try:  # building the parser imports every command (torch among them): a second or two of Ctrl-C window
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("error: interrupted before anything was written", file=sys.stderr)
        return 130
    if args.command is None:  # bare ``ex4d``: the overview, not an error
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ex4d.errors import UserError
    from ex4d.io.files import is_disk_full, write_policy

    _terminate_like_ctrl_c()
    try:
        with write_policy(overwrite=getattr(args, "overwrite", False)):
            result = args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("error: interrupted; partial outputs were not kept", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except OSError as exc:
        if args.debug:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        if is_disk_full(exc):  # the user's disk, not a bug; atomic writes kept no partial file
            print(f"error: no space left on the disk{where}; free some space or choose another -o, then rerun "
                  f"(partial outputs were not kept)", file=sys.stderr)
            return 1
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # the user's permissions, not a bug
            print(f"error: permission denied{where} ({exc.strerror}); choose another -o or fix the permissions",
                  file=sys.stderr)
            return 1
        print(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3
    except Exception as exc:  # a bug, not a user error
        if args.debug:
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
