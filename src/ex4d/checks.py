"""Number checks of the options that the library and the command line share.

Each ``check_*`` runs before any work starts and raises a one-line :class:`ex4d.errors.InputError`
(exit 1) that names the option, the accepted range and a valid value. The ranges are stated in each
option's help text from the constants below. (They live here, below the commands, so that the
library -- ``ex4d.pipeline``'s option classes -- can use them without importing command code.)
"""

from __future__ import annotations

import math

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
        raise InputError(f"--guidance (--cfg) must be a finite guidance scale from {MIN_CFG:g} (no guidance) to "
                         f"{MAX_CFG:g}, got {cfg}; the reference uses --guidance 5")
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


#: Flow-matching shift of the sampler: 1 = unshifted; the reference (and the distillation LoRAs) use 5.
MIN_SHIFT, MAX_SHIFT = 0.1, 100.0


def check_shift(shift) -> float:
    if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift)
                                       and MIN_SHIFT <= shift <= MAX_SHIFT):
        raise InputError(f"--shift must be a finite flow shift from {MIN_SHIFT:g} to {MAX_SHIFT:g}, got {shift}; "
                         f"the reference uses --shift 5")
    return float(shift)
