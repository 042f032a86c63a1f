"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from ex4d.devices import resolve_device  # noqa: F401  (re-exported for the commands)


def progress(iterable=None, total=None, desc: str = "", **kwargs):
    """A tqdm progress bar on stderr, hidden when stderr is not a terminal unless forced."""
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=kwargs.pop("disable", None), **kwargs)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
