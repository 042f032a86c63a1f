"""Progress and Abort for the app's runs: the library's ``progress`` hooks reported to the page.

No gradio here: the page passes a ``report(done, total, desc)`` callable (gradio's progress bar).
"""

from __future__ import annotations

import threading
from typing import Callable

from ex4d.errors import UserError

#: ``report(done, total, desc)``: how the page learns of progress (gradio's progress bar).
Report = Callable[[int, "int | None", str], None]


class Aborted(UserError):
    """The user pressed Abort; the run stopped at the next step and kept nothing."""


class StepBar:
    """A tqdm-like bar for the library's ``progress`` hooks: iterated (``bar(iterable)``), or used as
    ``with bar(total=n) as b: b.update()`` as the sampler does. Each step reports to the page and checks
    the session's abort flag, so Abort stops a run at its next frame or sampling step."""

    def __init__(self, iterable=None, total=None, desc: str = "", report: Report | None = None,
                 abort: threading.Event | None = None):
        self.iterable, self.desc, self.n = iterable, desc, 0
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self._report, self._abort = total, report, abort
        self._check()

    def _check(self) -> None:
        if self._abort is not None and self._abort.is_set():
            raise Aborted("aborted; nothing of this run was kept")
        if self._report is not None:
            self._report(self.n, self.total, self.desc)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc or self.desc

    def close(self) -> None:
        pass


def step_bars(report: Report | None, abort: threading.Event | None):
    """The ``progress`` callable the pipeline functions take, built on :class:`StepBar`."""

    def bars(iterable=None, total=None, desc: str = "", unit: str = "it", **kwargs):
        return StepBar(iterable, total=total, desc=desc, report=report, abort=abort)

    return bars
