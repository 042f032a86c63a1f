"""Arguments, number checks and progress display shared by several subcommands.

Number checks (``check_*``) run before any work starts and raise a one-line
:class:`ex4d.errors.InputError` (exit 1) that names the option, the accepted range and a valid value.
The ranges are stated in each option's help text from the constants below.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from ex4d.devices import resolve_device  # noqa: F401  (re-exported for the commands)
from ex4d.errors import InputError

#: Accepted output frame rates (--fps of synth, recon, generate, run).
MIN_FPS, MAX_FPS = 1.0, 240.0
#: Seeds: what both numpy and torch generators accept without wrapping around.
MAX_SEED = 2**63 - 1
#: Sampling steps of the generator.
MAX_STEPS = 1000
#: Text guidance scale: 1 = no guidance; far above the reference's 5 the video saturates.
MIN_CFG, MAX_CFG = 1.0, 20.0
#: Largest side of the generator's working size (memory grows with the square of it).
MAX_GENERATE_SIDE = 2048
#: Largest frame (pixels) that recon/depth take with --resize keep: 4096x2160 ("4K").
MAX_RECON_PIXELS = 4096 * 2160
#: Largest side of a synthetic clip.
MAX_SYNTH_SIDE = 2048
#: Largest frame count of a synthetic clip.
MAX_SYNTH_FRAMES = 10_000


# ---------------------------------------------------------------------------------------------
# Number checks


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_fps(value, option: str = "--fps", default: str = "leave it out for the source's rate") -> float | None:
    """None (the default), or a frame rate in [MIN_FPS, MAX_FPS]."""
    if value is None:
        return None
    try:
        fps = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{option} {value!r} is not a number; give a frame rate such as 15 ({default})") from None
    if not (math.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS):
        raise InputError(f"{option} must be a frame rate from {MIN_FPS:g} to {MAX_FPS:g}, got {value}; "
                         f"give e.g. 15 or 30 ({default})")
    return fps


def check_int(value, option: str, low: int, high: int | None = None, example: int | None = None) -> int:
    """An int in [low, high] (high None: no upper bound)."""
    example = low if example is None else example
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{option} must be a whole number, got {value!r}; e.g. {option} {example}")
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise InputError(f"{option} must be {span}, got {value}; e.g. {option} {example}")
    return value


def check_seed(seed) -> int:
    return check_int(seed, "--seed", 0, MAX_SEED, example=0)


def check_cfg(cfg) -> float:
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and MIN_CFG <= cfg <= MAX_CFG):
        raise InputError(f"--cfg must be a finite guidance scale from {MIN_CFG:g} (no guidance) to {MAX_CFG:g}, "
                         f"got {cfg}; the reference uses --cfg 5")
    return float(cfg)


def check_positive(value, option: str, example: str) -> float | None:
    """None, or a finite number > 0."""
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{option} must be a finite number > 0, got {value}; e.g. {option} {example}")
    return float(value)


def largest_4k1(n: int) -> int:
    """The largest 4k+1 frame count <= n (at least 1): a --num-frames valid for generation too."""
    return max(1, (int(n) - 1) // 4 * 4 + 1)


def check_4k1(value: int, option: str, why: str) -> int:
    """``value`` must be 4k+1 (1, 5, 9, ..., 49, ...); the message suggests the nearest lower one."""
    check_int(value, option, 1, example=49)
    if (value - 1) % 4:
        raise InputError(f"{option} {value}: {why} needs 4k+1 frames (..., 41, 45, 49, 53, ...); "
                         f"pass {option} {largest_4k1(value)}")
    return value


def check_windows(window: int, overlap: int) -> None:
    """--window (4k+1, >= 5) and --overlap (1 .. window-1)."""
    check_int(window, "--window", 5, example=49)
    if (window - 1) % 4:
        raise InputError(f"--window {window}: a generation window needs 4k+1 frames (..., 41, 45, 49, ...); "
                         f"pass --window {largest_4k1(window)}")
    suggestion = 4 * max(1, math.ceil((window / 3 - 1) / 4)) + 1
    if suggestion >= window:
        suggestion = 1
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 1 <= overlap < window:
        raise InputError(f"--overlap must be from 1 to --window - 1 = {window - 1} frames, got {overlap}; "
                         f"e.g. --overlap {suggestion}")


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
