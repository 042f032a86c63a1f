"""Stage 1: per-frame z-depth for a clip.

Estimators share one protocol: ``estimate(frames (T, H, W, 3) float [0, 1]) -> DepthVideo`` with
z-depth (T, H, W) in the reference's range (see :mod:`ex4d.depth.normalize`). Estimators with
``streams = True`` (both below) also take a lazy :class:`~ex4d.types.Clip`:
``estimate(clip, spill_dir=folder)`` reads it frame by frame / window by window and returns depth and
valid as :class:`~ex4d.io.arrays.FrameSequence` objects, so memory does not grow with T (the values
are identical; the whole-clip min-max normalisation goes through a temporary spill in ``spill_dir``).

- ``depthcrafter``: DepthCrafter as EX-4D runs it (the paper's choice; ~5 GB of weights).
- ``depth-anything``: Depth Anything V2 per frame, aligned over time (light, fast).
- ``vda`` / ``vda-metric``: Video Depth Anything Small, relative / in metres (fast, temporally
  consistent, Apache-2.0); ``vda-base``, ``vda-large``, ``vda-metric-base``, ``vda-metric-large``: the
  larger sizes (CC-BY-NC-4.0, non-commercial).
- a ``.npz`` / ``.npy`` path: :func:`load_depth_file`.

Heavy modules (diffusers, transformers) are imported only when an estimator is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ex4d.depth.files import FileDepth, load_depth_file
from ex4d.depth.normalize import disparity_to_depth, minmax_normalize, normalized_disparity_to_depth
from ex4d.errors import InputError
from ex4d.types import DepthVideo

__all__ = ["DepthEstimator", "get_estimator", "load_depth_file", "FileDepth", "ESTIMATORS",
           "disparity_to_depth", "minmax_normalize", "normalized_disparity_to_depth"]

#: Estimator names accepted by :func:`get_estimator` (besides a file path).
ESTIMATORS = ("depthcrafter", "depth-anything", "vda", "vda-metric", "vda-base", "vda-large", "vda-metric-base",
              "vda-metric-large")


@runtime_checkable
class DepthEstimator(Protocol):
    name: str

    def estimate(self, frames: np.ndarray) -> DepthVideo:
        """frames: (T, H, W, 3) float in [0, 1] -> DepthVideo with depth (T, H, W).

        With ``streams = True`` on the class, ``frames`` may also be a lazy Clip (keyword ``spill_dir``)."""
        ...


def get_estimator(spec: str, *, models_dir: str | os.PathLike | None = None, device: str = "auto",
                  **options) -> DepthEstimator:
    """Build the estimator named by ``spec``: one of :data:`ESTIMATORS`, or a .npz/.npy path.

    models_dir: folder with downloaded weights (layout in docs/depth.md); weights are otherwise
    taken from the Hugging Face cache or downloaded when online. device: "auto", "cpu", "cuda[:N]".
    options: passed to the estimator (e.g. ``progress``, ``dtype``, ``offload``, ``num_inference_steps``).
    Raises MissingWeightsError (exit 2) when weights are unavailable, InputError for a bad spec.
    """
    spec = str(spec)
    if Path(spec).suffix.lower() in (".npz", ".npy"):
        return FileDepth(spec, kind=options.get("kind", "auto"))
    key = spec.lower().replace("_", "-")
    if key == "depthcrafter":
        from ex4d.depth.depthcrafter import DepthCrafter

        return DepthCrafter.from_pretrained(models_dir=models_dir, device=device, **options)
    if key in ("depth-anything", "depth-anything-v2", "depthanything"):
        from ex4d.depth.depth_anything import DepthAnythingV2

        return DepthAnythingV2.from_pretrained(models_dir=models_dir, device=device, **options)
    from ex4d.depth.weights import VDA_NAMES

    if key in VDA_NAMES:
        from ex4d.depth.vda import VideoDepthAnything

        variant, metric = VDA_NAMES[key]
        return VideoDepthAnything.from_pretrained(models_dir=models_dir, device=device, variant=variant,
                                                  metric=metric, **options)
    raise InputError(f"unknown depth estimator {spec!r}; use one of {', '.join(ESTIMATORS)} or a .npz/.npy file")
