"""Every option of every command explains itself: help text, and its default where it has one."""

from __future__ import annotations

import argparse

import pytest

from ex4d.cli import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
            yield action


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_has_help_that_states_its_default(command):
    parser = _subparsers()[command]
    problems = []
    for action in _options(parser):
        name = action.option_strings[-1]
        if not action.help:
            problems.append(f"{name}: no help text")
            continue
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._CountAction, argparse._VersionAction))
        has_default = action.default not in (None, argparse.SUPPRESS) and not action.required
        if has_default and not flag and "default" not in action.help.lower():
            problems.append(f"{name}: default {action.default!r} not stated in its help")
    assert not problems, f"ex4d {command}: " + "; ".join(problems)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_command_has_overwrite_and_a_description(command):
    parser = _subparsers()[command]
    assert any("--overwrite" in a.option_strings for a in parser._actions)
    assert parser.description, f"ex4d {command} has no description"


@pytest.mark.parametrize("argv", [["recon"], ["train", "pairs", "-o", "runs", "--size", "512", "512"],
                                  ["bogus"], ["generate", "--color", "c.mp4", "-o", "g.mp4", "--steps", "many"]])
def test_usage_mistakes_are_one_line_exit_1(argv, capsys):
    from ex4d.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1  # exit 2 is reserved for missing weights
    assert err.count("\n") == 1 and err.startswith("error: ex4d") and "--help" in err
