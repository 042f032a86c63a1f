"""Arguments, number checks and progress display shared by several subcommands.

Number checks (``check_*``, defined in :mod:`ex4d.checks`) run before any work starts and raise a
one-line :class:`ex4d.errors.InputError` (exit 1) that names the option, the accepted range and a
valid value.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from ex4d.devices import resolve_device  # noqa: F401  (re-exported for the commands)

# The number checks live in ex4d.checks (the library uses them too); re-exported for the commands.
from ex4d.checks import (  # noqa: F401
    MIN_FPS,
    MAX_FPS,
    MAX_SEED,
    MAX_STEPS,
    MIN_CFG,
    MAX_CFG,
    MIN_SHIFT,
    MAX_SHIFT,
    MAX_GENERATE_SIDE,
    MAX_RECON_PIXELS,
    MAX_SYNTH_SIDE,
    MAX_SYNTH_FRAMES,
    check_fps,
    check_int,
    check_seed,
    check_cfg,
    check_positive,
    largest_4k1,
    check_4k1,
    check_windows,
)


# ---------------------------------------------------------------------------------------------
# Progress


def progress(iterable=None, total=None, desc: str = "", **kwargs):
    """A progress display on stderr: a tqdm bar on a terminal, plain periodic lines otherwise.

    Plain lines (:class:`PlainProgress`) suit logs and pipes, where a bar's carriage returns turn into
    one unreadable line. ``disable=True`` shows nothing.
    """
    if kwargs.get("disable"):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, **kwargs)
    kwargs.pop("disable", None)
    if _stderr_is_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, **kwargs)
    return PlainProgress(iterable, total=total, desc=desc, **kwargs)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """The part of tqdm's interface that ex4d uses, printed as plain lines (no carriage returns).

    One line ``desc: n/total unit (p%)`` at every tenth of ``total`` (and at the end), or, with no
    known total, at 1, 2, 4, 8, ... items; at most one line per ``min_interval`` seconds except the
    last. Iterate over it, or call :meth:`update`; use it as a context manager or :meth:`close` it.
    """

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", initial: int = 0,
                 file=None, min_interval: float = 0.0, **_ignored):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = int(initial)
        self.file = file
        self.min_interval = min_interval
        self.postfix = ""
        self._next_mark = self._mark_after(self.n)
        self._printed_n = None
        self._last_time = -math.inf
        self._closed = False

    def _mark_after(self, n: int) -> int:
        if self.total:
            step = max(1, math.ceil(self.total / 10))
            return (n // step + 1) * step
        return 1 if n < 1 else 2 ** (int(n).bit_length())

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next_mark:
            self._next_mark = self._mark_after(self.n)
            if self.total is None or self.n < self.total:
                now = time.monotonic()
                if now - self._last_time >= self.min_interval:
                    self._last_time = now
                    self._print()

    def _print(self) -> None:
        if self.total:
            text = f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)"
        else:
            text = f"{self.n} {self.unit}"
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self.postfix}" if self.postfix else ""
        print(f"{head}{text}{tail}", file=self.file or sys.stderr, flush=True)
        self._printed_n = self.n

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh=True) -> None:
        self.postfix = str(s)

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str, file=None, end: str = "\n") -> None:
        print(s, file=file or self.file or sys.stderr, end=end, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n > 0 and self._printed_n != self.n:
            self._print()


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda if available, else cpu; the default), cpu, cuda, cuda:1, ...")
