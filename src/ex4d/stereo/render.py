"""Render the right eye of a stereo pair: every frame, frame 0 included, is a render.

Other camera paths start at the source camera, so the condition's frame 0 is the source frame itself
(:mod:`ex4d.render.condition`). A stereo right eye never sits at the source camera: its frame 0 must be
rendered like every other frame. :func:`iter_stereo_condition` gets that from the unchanged renderer by
prepending the source camera to the path and feeding frame 0 twice, then dropping the first output.

The video model takes frame 0 of the condition as its given first image (image-to-video), so holes in
frame 0 would stay in the generated video. Frame 0's few disocclusions (thin slivers for a small
baseline) are therefore filled by a classical stereo fill (:func:`fill_disocclusions`) and its mask
is set to all-visible, as the generator expects; frames >= 1 keep their true masks and are
completed by the model.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from ex4d.types import Trajectory


def fill_disocclusions(color: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill the unseen pixels of a right-eye view from the nearest seen pixel to their right in the row.

    color: (H, W, 3); mask: (H, W) bool, True where seen. In a right eye (camera moved to +x) every
    point moves left by f B / z, nearer points more, so a disocclusion opens just right of a foreground
    edge and is bounded on its right by the background it belongs to: filling from the right copies
    background, never foreground (the rule of depth-image-based rendering). Holes with nothing seen to
    their right (the right image border) are filled from the left; rows with nothing seen stay as they
    are. Returns a new (H, W, 3) array.
    """
    color = np.asarray(color)
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    columns = np.broadcast_to(np.arange(width), (height, width))
    big = width  # "no seen pixel" marker for the right-hand search
    right = np.where(mask, columns, big)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    left = np.maximum.accumulate(np.where(mask, columns, -1), axis=1)
    source = np.where(right < big, right, left)
    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    fill = ~mask & (source >= 0)
    out = np.array(color, copy=True)
    out[fill] = color[rows[fill], source[fill]]
    return out


def iter_stereo_condition(frames: Iterable[np.ndarray], depth: Iterable[np.ndarray], K_src, trajectory: Trajectory, *,
                          size: tuple[int, int], num_frames: int, only_first_frame: bool = False,
                          mesh_callback: Callable[[int, object], None] | None = None,
                          fill_first_frame: bool = True, stats: dict | None = None,
                          progress: Callable[[Iterable], Iterable] | None = None, **options) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`ex4d.render.condition.iter_condition` for a stereo right eye: frame 0 is rendered too.

    Arguments as for ``iter_condition`` (``options`` are passed on). fill_first_frame: fill frame 0's
    disocclusions (:func:`fill_disocclusions`) and mark it all-visible (default; what the generator
    needs); False yields frame 0's true render and mask. stats: if given, receives
    ``first_frame_filled_fraction`` (the share of frame 0 that was filled).
    Yields (color (H, W, 3) float32, mask (H, W) bool) for each of the trajectory's T frames.
    """
    from ex4d.render.condition import iter_condition

    frames_it, depth_it = iter(frames), iter(depth)
    first_frame, first_depth = next(frames_it, None), next(depth_it, None)

    def doubled(first, rest):
        if first is None:
            return
        yield first
        yield first
        yield from rest

    padded = Trajectory(np.concatenate([np.eye(4)[None], trajectory.cam_from_world]),
                        np.concatenate([trajectory.K[:1], trajectory.K]), name=trajectory.name,
                        settings=trajectory.settings)

    def callback(k: int, mesh) -> None:
        if only_first_frame:  # called once, with frame 0's mesh
            mesh_callback(0, mesh)
        elif k >= 1:  # k = 0 is the source pass that is dropped
            mesh_callback(k - 1, mesh)

    stream = iter_condition(doubled(first_frame, frames_it), doubled(first_depth, depth_it), K_src, padded,
                            size=size, num_frames=int(num_frames) + 1, only_first_frame=only_first_frame,
                            mesh_callback=None if mesh_callback is None else callback, **options)
    next(stream)  # the source frame at the source camera: the left eye, not ours
    steps: Iterable[int] = range(trajectory.num_frames)
    if progress is not None:  # over the right eye's frames only
        steps = progress(steps)
    for k in steps:
        color, mask = next(stream)
        if k == 0 and fill_first_frame:
            if stats is not None:
                stats["first_frame_filled_fraction"] = float(1.0 - mask.mean())
            color = fill_disocclusions(color, mask).astype(np.float32, copy=False)
            mask = np.ones_like(mask)
        yield color, mask
    for _ in stream:  # nothing is left; this lets the renderer close (and log) now, not at garbage collection
        pass
