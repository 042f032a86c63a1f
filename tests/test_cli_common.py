"""Shared command helpers: the plain progress lines and the number checks."""

from __future__ import annotations

import io
import math

import pytest
from tqdm import tqdm

from ex4d.commands import common
from ex4d.commands.common import PlainProgress, check_4k1, check_fps, check_seed, check_windows, largest_4k1, progress
from ex4d.errors import InputError


def test_progress_off_a_terminal_prints_plain_periodic_lines(capsys):
    items = list(progress(range(100), desc="render", unit="frame"))
    assert items == list(range(100))
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines[0] == "render: 10/100 frame (10%)"
    assert lines[-1] == "render: 100/100 frame (100%)"
    assert len(lines) == 10  # every tenth, the last one once


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(common, "_stderr_is_terminal", lambda: True)
    bar = progress(range(3), desc="x")
    assert isinstance(bar, tqdm)
    bar.close()


def test_plain_progress_manual_updates_unknown_total_and_postfix():
    out = io.StringIO()
    with PlainProgress(total=None, desc="jobs", unit="job", file=out) as bar:
        for _ in range(5):
            bar.update(1)
        bar.set_postfix(failed=0)
    assert out.getvalue().splitlines() == ["jobs: 1 job", "jobs: 2 job", "jobs: 4 job", "jobs: 5 job failed=0"]
    silent = io.StringIO()
    PlainProgress(total=3, file=silent).close()  # nothing done: nothing printed
    assert silent.getvalue() == ""


def test_progress_disabled_prints_nothing(capsys):
    assert list(progress(range(5), disable=True)) == list(range(5))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", [-1, 0, 0.5, 1e-9, 241, 1e9, math.nan, math.inf, -math.inf, "fast"])
def test_check_fps_refuses(value):
    with pytest.raises(InputError, match="--fps"):
        check_fps(value)


def test_check_fps_accepts():
    assert check_fps(None) is None
    assert check_fps(1) == 1.0 and check_fps("29.97") == 29.97 and check_fps(240) == 240.0


def test_check_seed():
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, True):
        with pytest.raises(InputError, match="--seed"):
            check_seed(bad)


def test_4k1_suggestions_are_valid():
    for n in range(1, 60):
        suggestion = largest_4k1(n)
        assert (suggestion - 1) % 4 == 0 and 1 <= suggestion <= n
    with pytest.raises(InputError, match=r"--num-frames 49\b"):
        check_4k1(50, "--num-frames", "generation")
    assert check_4k1(49, "--num-frames", "generation") == 49


@pytest.mark.parametrize("window", [5, 9, 13, 49, 81])
def test_window_overlap_suggestion_is_accepted(window):
    check_windows(window, 1)
    with pytest.raises(InputError) as info:
        check_windows(window, window)
    suggested = int(str(info.value).rsplit("--overlap ", 1)[1])
    check_windows(window, suggested)  # the suggestion itself passes
