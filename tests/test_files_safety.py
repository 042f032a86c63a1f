"""The write policy of ex4d.io.files: whole-or-nothing outputs, no foreign or input file overwritten,
temporaries of killed processes swept, and the CLI's exit codes around it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ex4d.cli import main as cli_main
from ex4d.errors import InputError
from ex4d.io import files
from ex4d.io.files import (LEDGER_NAME, atomic_dir, atomic_path, check_outputs, is_ex4d_file, require_file,
                           sweep_folder, write_policy)


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_atomic_path_records_its_files_and_may_replace_them(tmp_path):
    out = tmp_path / "a.json"
    _write(out, "one")
    assert out.read_text() == "one" and is_ex4d_file(out)
    assert "a.json" in json.loads((tmp_path / LEDGER_NAME).read_text())["files"]
    _write(out, "two")  # ex4d's own file: replaced without --overwrite
    assert out.read_text() == "two" and _leftovers(tmp_path) == []


def test_foreign_file_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "depth.npz"
    out.write_bytes(b"the user's own file")
    with pytest.raises(InputError, match="did not write.*--overwrite"):
        _write(out, "new")
    assert out.read_bytes() == b"the user's own file" and _leftovers(tmp_path) == []
    with write_policy(overwrite=True):
        _write(out, "new")
    assert out.read_text() == "new" and is_ex4d_file(out)


def test_ex4d_file_edited_by_the_user_becomes_foreign(tmp_path):
    out = tmp_path / "x.json"
    _write(out, "ex4d")
    time.sleep(0.01)
    out.write_text("edited by hand, longer")
    assert not is_ex4d_file(out)
    with pytest.raises(InputError, match="did not write"):
        _write(out, "again")
    assert out.read_text() == "edited by hand, longer"


def test_inputs_are_never_written_even_with_overwrite(tmp_path):
    video = tmp_path / "color_90.mp4"
    _write(video, "ex4d wrote this earlier")
    with write_policy(overwrite=True):
        require_file(video, "video")
        with pytest.raises(InputError, match="also an input"):
            check_outputs([tmp_path / "other.mp4", video])
        with pytest.raises(InputError, match="also an input"):
            _write(tmp_path / "." / "color_90.mp4", "clobber")
    assert video.read_text() == "ex4d wrote this earlier"


def test_input_reached_through_a_symlink_is_still_protected(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("input")
    (tmp_path / "link.json").symlink_to(real)
    with write_policy(overwrite=True):
        require_file(tmp_path / "link.json")
        with pytest.raises(InputError):
            _write(real, "clobber")
    assert real.read_text() == "input"


def test_failed_write_leaves_neither_output_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "v.mp4") as tmp:
            tmp.write_text("half")
            raise RuntimeError("encoder died")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_swaps_without_a_gap_and_keeps_the_old_folder_on_failure(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "w.bin").write_text("v2-half")
            raise RuntimeError("killed")
    assert (final / "w.bin").read_text() == "v1"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_text("v2")
    assert (final / "w.bin").read_text() == "v2" and _leftovers(tmp_path) == []


def test_foreign_folder_is_not_replaced_by_atomic_dir(tmp_path):
    final = tmp_path / "runs"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="folder that ex4d did not write"):
        with atomic_dir(final):
            pass
    assert (final / "notes.txt").read_text() == "mine"


def test_folder_caught_between_the_two_renames_comes_back(tmp_path):
    final = tmp_path / "pair"
    with atomic_dir(final) as tmp:
        (tmp / "video.mp4").write_text("old")
    # A process killed after moving the old folder aside and before moving the new one in:
    host = files._owner_tag().rsplit("-", 1)[0]
    aside = tmp_path / f".pair.old-{host}-{_dead_pid()}-abcd"
    os.replace(final, aside)
    staged = tmp_path / f".pair.partial-{host}-{_dead_pid()}-ef01"
    staged.mkdir()
    (staged / "video.mp4").write_text("new, complete or not: nobody can tell")
    touched = sweep_folder(tmp_path)
    assert {p.name for p in touched} == {aside.name, staged.name}
    assert (final / "video.mp4").read_text() == "old" and _leftovers(tmp_path) == []


def test_temporaries_of_live_processes_and_other_hosts_are_left_alone(tmp_path):
    host = files._owner_tag().rsplit("-", 1)[0]
    live = tmp_path / f".v.partial-{host}-{os.getpid()}-aaaa.mp4"
    other_host = tmp_path / f".v.partial-otherhost-{_dead_pid()}-bbbb.mp4"
    live.write_text("writing")
    other_host.write_text("writing elsewhere")
    assert sweep_folder(tmp_path) == []
    assert live.exists() and other_host.exists()


def test_sigkill_mid_write_leaves_a_temporary_that_the_next_write_sweeps(tmp_path):
    out = tmp_path / "color_90.mp4"
    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from ex4d.io.files import atomic_path
        with atomic_path(Path({str(out)!r})) as tmp:
            tmp.write_text("half a video")
            Path({str(tmp_path / "ready")!r}).write_text(str(os.getpid()))
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(300):
            if (tmp_path / "ready").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "ready").exists(), "the writer never started"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not out.exists()  # nothing that looks finished
    assert len(_leftovers(tmp_path)) == 1  # SIGKILL runs no cleanup: the temporary stays ...
    _write(out, "a whole video")  # ... until the same output is written again
    assert out.read_text() == "a whole video" and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- CLI


def test_bare_ex4d_prints_help_and_version_exists(capsys):
    assert cli_main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("ex4d ")


def test_full_disk_is_one_line_exit_1_not_an_internal_error(tmp_path, monkeypatch, capsys):
    import ex4d.commands.synth as synth

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "video.mp4"))

    monkeypatch.setattr(synth, "main", full_disk)
    assert cli_main(["synth", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err and "internal error" not in err


def test_overwrite_switch_reaches_the_write_policy(tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "video.mp4").write_bytes(b"my holiday video")
    args = ["synth", "-o", str(out), "--num-frames", "2", "--size", "32x32"]
    assert cli_main(args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not write" in errors[0] and "--overwrite" in errors[0]
    assert (out / "video.mp4").read_bytes() == b"my holiday video"
    assert cli_main(args + ["--overwrite"]) == 0
    assert (out / "video.mp4").read_bytes() != b"my holiday video"


def test_permission_denied_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    import ex4d.commands.synth as synth

    def read_only(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "video.mp4"))

    monkeypatch.setattr(synth, "main", read_only)
    assert cli_main(["synth", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied" in err and "internal error" not in err


def test_sigterm_unwinds_like_ctrl_c_and_keeps_nothing_partial(tmp_path):
    """A scheduler's SIGTERM removes the temporary (unlike SIGKILL) and exits 143 with the one line."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import ex4d.commands.synth as synth
        from ex4d.cli import main
        from ex4d.io.files import atomic_path

        def slow(args):
            with atomic_path(Path({str(tmp_path / "video.mp4")!r})) as tmp:
                tmp.write_text("half")
                Path({str(tmp_path / "ready")!r}).write_text("1")
                time.sleep(60)

        synth.main = slow
        sys.exit(main(["synth", "-o", {str(tmp_path)!r}]))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if (tmp_path / "ready").exists():
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143 and "interrupted; partial outputs were not kept" in err
    assert not (tmp_path / "video.mp4").exists() and _leftovers(tmp_path) == []


def test_ctrl_c_while_the_commands_load_is_one_line_and_130(monkeypatch, capsys):
    """Ctrl-C in the first second or two (the commands import torch) is an interrupt, not a traceback."""
    from ex4d import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["synth", "-o", "anywhere"]) == 130
    err = capsys.readouterr().err
    assert err == "error: interrupted before anything was written\n"
