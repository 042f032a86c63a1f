"""Peak resident memory of one ``ex4d`` command, as the command itself sees it (for the memory benches).

The command runs in a child process that prints its own high-water mark (``VmHWM`` of
/proc/self/status) as it exits. Not ``ru_maxrss``: Linux folds the *parent's* resident size at exec
time into a child's ``ru_maxrss``, so a bench that has just written large inputs would report them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

_MARK = "ex4d-bench-VmHWM-kB:"
#: The child: ``ex4d`` itself, then its own peak resident memory (kB) as the last stderr line.
_CHILD = f"""
import sys
from ex4d.cli import main
code = main(sys.argv[1:])
hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print('{_MARK}', hwm, file=sys.stderr)
sys.exit(code)
"""


def run_ex4d(args: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``ex4d ARGS`` to completion; return (peak resident MB, seconds with process start).

    A failing command stops the bench with its exit code and the end of its stderr.
    """
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or _MARK not in proc.stderr:
        raise SystemExit(f"ex4d {' '.join(args[:2])} failed (exit {proc.returncode}): {proc.stderr[-800:]}")
    peak_kb = int(proc.stderr.rsplit(_MARK, 1)[1].split()[0])
    return peak_kb / 1024, seconds


def make_clip(folder: Path, frames: int, size: int) -> Path:
    """A moving checkerboard with colour ramps (lossless FFV1, ``clip_<frames>.mkv``), written frame by frame."""
    import numpy as np

    from ex4d.io.video import VideoWriter

    u, v = np.meshgrid(np.arange(size), np.arange(size))
    video = folder / f"clip_{frames}.mkv"
    with VideoWriter(video, 24, codec="ffv1") as writer:
        for k in range(frames):
            checker = (((u + k) // 16 + v // 16) % 2) * 200 + 30
            writer.write(np.stack([checker, u * 255 // size, v * 255 // size], -1).astype(np.uint8))
    return video


def git_commit() -> str:
    """Short hash of the checked-out commit ($EX4D_COMMIT if set), or ``unknown``."""
    if os.environ.get("EX4D_COMMIT"):  # the device machine's copy of the tree may lack .git
        return os.environ["EX4D_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
