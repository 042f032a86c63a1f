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
import importlib
import logging
import sys

#: Subcommand modules under ex4d.commands, in the order ``--help`` lists them.
COMMANDS = ["synth", "depth", "recon", "generate", "run", "convert", "make_pairs", "train", "batch", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ex4d",
        description="Re-film one video along a new camera path (EX-4D: depth -> DW-Mesh -> render -> Wan2.1 + adapter).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ex4d.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ex4d.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ex4d.errors import UserError

    try:
        result = args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; partial outputs were not kept", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error
        if args.debug:
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
