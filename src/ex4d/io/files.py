"""File-system helpers shared by every stage: atomic writes, output-folder checks and the write policy.

Users' files are sacred. Three rules, enforced here so that every stage gets them for free:

1. **Outputs appear whole or not at all.** :func:`atomic_path` / :func:`atomic_dir` write under a
   temporary name (``.<name>.partial-<host>-<pid>-<random>``) and rename into place only when the
   block succeeds. Temporaries left by a killed process (SIGKILL, power loss) are swept the next time
   the same output is written, once their process is gone.
2. **Never overwrite a file ex4d did not write.** Every completed write is recorded in the folder's
   ledger, ``.ex4d-files.json`` (name -> size and mtime). An existing file that is not in the ledger,
   or that changed since ex4d wrote it, is *foreign*: replacing it needs ``--overwrite``
   (:func:`write_policy` with ``overwrite=True``).
3. **Never overwrite an input.** Inputs opened through :func:`require_file` (or passed to
   :func:`protect_inputs`) while a :func:`write_policy` is active can never be written to, with or
   without ``--overwrite``. Commands call :func:`check_outputs` on their planned outputs before any
   work, so a clash fails in a second rather than after rendering.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ex4d.errors import InputError

#: Per-folder record of the files ex4d wrote there (hidden; itself always ex4d's).
LEDGER_NAME = ".ex4d-files.json"


@dataclass
class WritePolicy:
    """What the current command may write: ``overwrite`` foreign files or not; never ``inputs``."""

    overwrite: bool = False
    inputs: set[Path] = field(default_factory=set)


_POLICY: contextvars.ContextVar[WritePolicy | None] = contextvars.ContextVar("ex4d_write_policy", default=None)


@contextlib.contextmanager
def write_policy(*, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[WritePolicy]:
    """Run a command (or one batch job) under a fresh policy; inputs it opens are protected from writes.

    Nested policies inherit the outer one's protected inputs (a batch job's inputs stay protected
    while the next job runs in the same process only if that job opens them too).
    """
    outer = _POLICY.get()
    policy = WritePolicy(overwrite=overwrite, inputs=set(outer.inputs) if outer is not None else set())
    token = _POLICY.set(policy)
    try:
        protect_inputs(*inputs)
        yield policy
    finally:
        _POLICY.reset(token)


def protect_inputs(*paths: str | os.PathLike | None) -> None:
    """Mark ``paths`` as inputs of the running command: no write may land on them."""
    policy = _POLICY.get()
    if policy is None:
        return
    for path in paths:
        if path is not None and str(path):
            policy.inputs.add(_resolve(path))


def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """Return ``path`` as a Path (protected as an input), or raise a one-line :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path} (check the path)")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    protect_inputs(path)
    return path


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that it is writable; raise :class:`InputError` if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} is an existing file; choose another -o")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {path}: {exc.strerror} (choose another -o)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {path} (choose another -o or fix its permissions)")
    return path


# ---------------------------------------------------------------------------------------------
# Ownership: the ledger of files ex4d wrote


def is_ex4d_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is exactly as ex4d last wrote it (same size and mtime as its ledger entry)."""
    path = Path(path)
    if path.name == LEDGER_NAME:
        return True
    entry = _read_ledger(path.parent).get(path.name)
    if entry is None:
        return False
    try:
        stat = path.stat()
    except OSError:
        return False
    if entry.get("kind") == "dir":
        return path.is_dir()
    return path.is_file() and entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def check_output(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse to write ``path`` if it is an input of this run, or a foreign file without ``--overwrite``.

    Missing files are always fine. Raises a one-line :class:`InputError` saying how to fix it.
    """
    path = Path(path)
    policy = _POLICY.get()
    resolved = _resolve(path)
    if policy is not None and resolved in policy.inputs:
        raise InputError(f"{what} {path} is also an input of this run and would be overwritten; "
                         f"choose another output path")
    if not (path.exists() or path.is_symlink()):
        return path
    if path.is_symlink():
        raise InputError(f"{what} {path} is a symbolic link; ex4d does not write through links, choose another -o")
    if (policy is None or not policy.overwrite) and not is_ex4d_file(path):
        kind = "folder" if path.is_dir() else "file"
        raise InputError(f"{what} {path} is an existing {kind} that ex4d did not write (or that changed since); "
                         f"move it away, choose another -o, or pass --overwrite to replace it")
    return path


def check_outputs(paths: Iterable[str | os.PathLike], what: str = "output") -> None:
    """:func:`check_output` for every planned output, before any work starts."""
    for path in paths:
        check_output(path, what)


def forget_output(path: str | os.PathLike) -> None:
    """Delete ``path`` if ex4d wrote it (used to retract a record before its outputs are replaced)."""
    path = Path(path)
    if path.is_file() and is_ex4d_file(path):
        path.unlink()
        _update_ledger(path.parent, path.name, None)


def _record_written(path: Path) -> None:
    stat = path.stat()
    entry = {"kind": "dir"} if path.is_dir() else {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _update_ledger(path.parent, path.name, entry)


def _read_ledger(folder: Path) -> dict:
    try:
        data = json.loads((folder / LEDGER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _update_ledger(folder: Path, name: str, entry: dict | None) -> None:
    """Set (or with None, drop) one ledger entry; read-modify-write under a lock on the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # processes writing into one folder (batch workers) take turns
        files = _read_ledger(folder)
        if entry is None:
            files.pop(name, None)
        else:
            files[name] = entry
        tmp = folder / f".{LEDGER_NAME}.partial-{_owner_tag()}-{secrets.token_hex(4)}"
        tmp.write_text(json.dumps({"about": "files written by ex4d in this folder (do not edit)",
                                   "files": files}, indent=1, sort_keys=True))
        os.replace(tmp, folder / LEDGER_NAME)
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only if the block succeeds.

    The write is refused first (:func:`check_output`) if ``final_path`` is an input or a foreign
    file. A failed or interrupted write never leaves a file that looks finished. The temporary name
    keeps the final suffix so that writers which infer the format from it (PyAV, numpy) work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    check_output(final_path)
    sweep_stale_partials(final_path)
    tmp_path = final_path.with_name(f".{final_path.stem}{_PARTIAL}{_owner_tag()}-{secrets.token_hex(4)}"
                                    f"{final_path.suffix}")
    tmp_path.touch(mode=0o666)
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
        _record_written(final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_dir``; it replaces ``final_dir`` only if the block succeeds.

    For outputs made of several files (a training pair, a checkpoint): readers see either the old
    complete folder or the new complete one, never a half-written one and never none. The old folder
    is renamed aside, the new one renamed in, and only then is the old one deleted; a crash between
    the two renames is repaired by :func:`sweep_stale_partials` (the old folder comes back).
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    check_output(final_dir)
    sweep_stale_partials(final_dir)
    tag = f"{_owner_tag()}-{secrets.token_hex(4)}"
    tmp = final_dir.with_name(f".{final_dir.name}{_PARTIAL}{tag}")
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        old = final_dir.with_name(f".{final_dir.name}{_OLD}{tag}")
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        _record_written(final_dir)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_PARTIAL = ".partial-"
_OLD = ".old-"


def temporary_tag() -> str:
    """``.partial-<host>-<pid>-<random>``: append it to a hidden name (``.<name>``) for a temporary file or
    folder that :func:`sweep_stale_partials` removes once this process is gone."""
    return f"{_PARTIAL}{_owner_tag()}-{secrets.token_hex(4)}"


def _owner_tag() -> str:
    """``host-pid`` of this process, so that a later run can tell whether a temporary is abandoned."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _abandoned(name: str, marker: str) -> bool:
    """True if the temporary ``name`` (``.<x><marker><host>-<pid>-<rand>...``) belongs to a dead process
    on this host. Temporaries of other hosts (a shared filesystem) are never judged."""
    tail = name.split(marker, 1)[1]
    parts = tail.split("-")
    if len(parts) < 3:
        return False
    host, pid = "-".join(parts[:-2]), parts[-2]
    if host != _owner_tag().rsplit("-", 1)[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_stale_partials(final_path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``final_path`` left by killed processes; restore a folder caught mid-swap.

    Returns the paths removed or restored. Only temporaries of dead processes on this host are touched.
    """
    final_path = Path(final_path)
    folder = final_path.parent
    touched: list[Path] = []
    if not folder.is_dir():
        return touched
    stems = {f".{final_path.stem}{_PARTIAL}", f".{final_path.name}{_PARTIAL}"}
    for entry in folder.iterdir():
        name = entry.name
        if any(name.startswith(s) for s in stems) and _abandoned(name, _PARTIAL):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            touched.append(entry)
        elif name.startswith(f".{final_path.name}{_OLD}") and _abandoned(name, _OLD):
            if final_path.exists():
                shutil.rmtree(entry, ignore_errors=True)  # the swap completed; only the delete was missed
            else:
                os.replace(entry, final_path)  # killed between the two renames: the old folder returns
            touched.append(entry)
    return touched


def sweep_folder(folder: str | os.PathLike) -> list[Path]:
    """:func:`sweep_stale_partials` for every abandoned temporary in ``folder`` (run at a command's start)."""
    folder = Path(folder)
    touched: list[Path] = []
    if not folder.is_dir():
        return touched
    for entry in list(folder.iterdir()):
        for marker in (_PARTIAL, _OLD):
            if entry.name.startswith(".") and marker in entry.name:
                base = entry.name[1:].split(marker, 1)[0]
                if base and _abandoned(entry.name, marker):
                    touched += sweep_stale_partials(folder / base)
                break
    return touched


def is_disk_full(exc: BaseException) -> bool:
    """True for the OS errors that mean the disk (or quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _resolve(path: str | os.PathLike) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))
