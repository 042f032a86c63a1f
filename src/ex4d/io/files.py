"""File-system helpers shared by every stage: atomic writes and output-folder checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ex4d.errors import InputError


def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """Return ``path`` as a Path, or raise a one-line :class:`InputError` if it is not a file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path} (check the path)")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    return path


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that it is writable; raise :class:`InputError` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {path}: {exc.strerror} (choose another -o)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {path} (choose another -o or fix its permissions)")
    return path


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only if the block succeeds.

    A failed or interrupted write therefore never leaves a file that looks finished. The temporary
    name keeps the final suffix so that writers which infer the format from it (PyAV, numpy) work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.stem}.", suffix=f".partial{final_path.suffix}",
                                    dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a normal write would have.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_dir``; it replaces ``final_dir`` only if the block succeeds.

    For outputs made of several files (a training pair, a checkpoint): readers see either the old
    complete folder or the new complete one, never a half-written one.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.partial-", dir=final_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700 folders
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
