"""Command-line values shared by ``ex4d make-pairs`` and ``ex4d train`` (parsed into one-line errors)."""

from __future__ import annotations

import re

from ex4d.errors import InputError

#: Largest side accepted by ``--size`` (a 4096x4096 clip of 49 frames is already 2.5 GB of float32).
MAX_SIDE = 4096


def parse_size(text: str, *, option: str = "--size", multiple: int = 2, minimum: int = 8,
               maximum: int = MAX_SIDE) -> tuple[int, int]:
    """``"HxW"`` -> (H, W), as every ex4d command spells sizes; anything else is one InputError.

    multiple: each side must be a multiple of it (2: H.264; 16: the generator's VAE x patch).
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise InputError(f"{option} {text!r} is not a size; write it as HxW, e.g. {option} 512x512")
    height, width = int(match.group(1)), int(match.group(2))
    if min(height, width) < minimum or max(height, width) > maximum or height % multiple or width % multiple:
        raise InputError(f"{option} {height}x{width}: each side must be a multiple of {multiple} between {minimum} "
                         f"and {maximum}, e.g. {option} 512x512")
    return height, width
