"""Render the generator's condition (colour + visibility mask) along a camera trajectory.

Per target frame k: build frame k's DW-Mesh (or reuse frame 0's with ``only_first_frame``), render
it with ``trajectory.cam_from_world[k]`` and ``trajectory.K[k]``, then, as the reference does:

* frame 0 is the source frame itself with a full mask (whatever the render would give);
* frames >= 1: mask = alpha > 125/255; colour = rendered RGB * mask (masked pixels black).

Flagged vertices (alpha 0) and empty pixels both end up with mask 0: "to be generated".
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ex4d.devices import resolve_device

from ex4d.errors import InputError
from ex4d.types import Condition, Trajectory

logger = logging.getLogger(__name__)

#: The reference keeps a pixel where its rendered alpha (0..255) exceeds 125.
MASK_ALPHA_THRESHOLD = 125.0 / 255.0
# The comparison runs in float32 (the render's precision), against the threshold rounded to float32.
_THRESHOLD_F32 = float(np.float32(MASK_ALPHA_THRESHOLD))


#: torch's CPU threads inside the render loop when the meshes are built on a GPU (None: leave torch's
#: own count). The loop's torch CPU work is small (threshold and mask, 8-bit conversion) and shares
#: the cores with the three encoders' threads and the GL driver, where torch's default of one thread
#: per core oversubscribes them: on a 16-core H100 machine, recon of 49 frames at 512x512 took 1.50 s
#: with 4 torch threads against 1.76 s with 16 (bench/bench_recon_stage.py; docs/benchmarks.md).
CUDA_LOOP_TORCH_THREADS: int | None = 4
#: With meshes on a GPU, finish each frame (the analytic antialiasing's CPU blend, then threshold and
#: mask) on a helper thread while the loop builds and draws the next one: the GPU and GL work of frame
#: k + 1 overlaps the CPU work of frame k. The frames are the same (each is finished exactly as before,
#: in order). With CPU meshes the finishing would compete with llvmpipe's threads for the same cores,
#: so it stays in line there.
CUDA_LOOP_OVERLAP: bool = True
#: Threads that finish frames with CUDA_LOOP_OVERLAP: frames k - N + 1 .. k are finished at once while
#: frame k + 1 is built and drawn. On an H100 machine the finishing (about 20 ms a frame, most of it the
#: blend, whose numpy calls release the GIL) took over twice the loop's own work per frame (mesh,
#: packing, GL: about 8 ms), so one thread was what bounded the loop. On this project's 2-core machine
#: two threads blended 12 frames in 0.29 s against 0.50 s for one.
CUDA_LOOP_FINISH_THREADS: int = 3


def _overlap_finishing(device: torch.device) -> bool:
    return CUDA_LOOP_OVERLAP and device.type == "cuda"


@contextlib.contextmanager
def limited_torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch's CPU ops on at most ``threads`` threads inside the block (restored afterwards;
    None: unchanged).

    On a CPU-only machine the per-frame loop alternates a small memory-bound torch mesh build
    with Mesa llvmpipe's rasteriser threads. torch's OpenMP workers then wait on cores that
    llvmpipe (or anything else) holds: measured on 2 shared cores, one torch thread used 3.7x
    less CPU time per 512x512 frame than two (138 vs 507 ms) and ran 4x faster.
    """
    previous = torch.get_num_threads()
    if threads is None or threads >= previous:
        yield
        return
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def finish_frame(rgba: np.ndarray, mask_out: np.ndarray, color_out: np.ndarray) -> None:
    """The reference's post-processing of one rendered frame, written into the output arrays.

    rgba: (H, W, 4) float32 render. mask_out: (H, W) bool <- alpha > 125/255.
    color_out: (H, W, 3) float32 <- clip(rgb * mask, 0, 1). The clip only catches the tiny
    overshoot of a pixel blended across several silhouette edges at once.

    Runs as three in-place torch ops on views of the numpy arrays (no temporaries): about 4x
    faster than the same numpy ufuncs on one thread, and they use torch's intra-op threads where
    they are allowed. Multiplying by 0/1 and clipping are exact, so the result equals the numpy
    formulation bit for bit.
    """
    src = torch.from_numpy(rgba)
    mask = torch.from_numpy(mask_out)
    color = torch.from_numpy(color_out)
    torch.gt(src[..., 3], _THRESHOLD_F32, out=mask)
    torch.mul(src[..., :3], mask[..., None], out=color)
    color.clamp_(0.0, 1.0)


def render_condition(frames, depth, K_src, trajectory: Trajectory, *, cap: str = "none", filter: str = "angle",
                     stretch_test: bool = False, watertight: bool = True, only_first_frame: bool = False,
                     device="cpu", fps: float = 30.0,
                     progress: Callable[[Iterable], Iterable] | None = None,
                     mesh_callback: Callable[[int, object], None] | None = None,
                     antialias: bool | str = True, border_depth: float | None = None,
                     pixel_convention: str = "centers") -> Condition:
    """Render ``frames`` + ``depth`` along ``trajectory`` into a :class:`~ex4d.types.Condition`.

    frames: (T, H, W, 3) float [0, 1] source colours. depth: (T, H, W) z-depth.
    K_src: (3, 3) source intrinsics (None -> the reference's f = 500, c = (W/2, H/2)).
    trajectory: T_out target poses and intrinsics; T_out must equal T unless ``only_first_frame``.
    cap / filter / stretch_test / watertight: DW-Mesh options (see :func:`ex4d.mesh.dwmesh.build_dw_mesh`).
    only_first_frame: reuse frame 0's mesh for every target frame (a static scene).
    device: where meshes are built ("cpu", "cuda", "auto"); rendering uses the EGL device.
    progress: optional wrapper around the frame iterator (e.g. tqdm).
    mesh_callback: optional ``callback(k, mesh)`` called with every frame's mesh (e.g. PLY export).
    antialias: True/"analytic" (silhouette blend like the reference's nvdiffrast antialias, default),
        "msaa" or False/"none"; see :mod:`ex4d.render.rasterizer`.
    border_depth: z of the pushed border ring; None -> the reference's 100.
    pixel_convention: "centers" (integer pixel coordinates are pixel centres; default) or
        "reference" (integer coordinates on pixel corners, as the reference's renderer).

    Returns Condition(color (T_out, H, W, 3) float32 already multiplied by the mask,
    mask (T_out, H, W) bool, fps, name=trajectory.name, settings=the options used).
    :func:`iter_condition` yields the same frames one at a time (for long videos).
    """
    frames = np.asarray(frames)
    depth = np.asarray(depth)
    _check_arrays(frames, depth)
    num_out = trajectory.num_frames
    settings: dict = {}
    stream = iter_condition(frames, depth, K_src, trajectory, size=frames.shape[1:3], num_frames=frames.shape[0],
                            cap=cap, filter=filter, stretch_test=stretch_test, watertight=watertight,
                            only_first_frame=only_first_frame, device=device, progress=progress,
                            mesh_callback=mesh_callback, antialias=antialias, border_depth=border_depth,
                            pixel_convention=pixel_convention, settings=settings)
    color = np.zeros((max(num_out, 0), *frames.shape[1:3], 3), dtype=np.float32)
    mask = np.zeros((max(num_out, 0), *frames.shape[1:3]), dtype=bool)
    for k, (color_k, mask_k) in enumerate(stream):
        color[k], mask[k] = color_k, mask_k
    return Condition(color=color, mask=mask, fps=float(fps), name=trajectory.name, settings=settings)


def _check_arrays(frames: np.ndarray, depth: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be (T, H, W, 3) float in [0, 1], got shape {frames.shape}")
    if not np.issubdtype(frames.dtype, np.floating):
        raise InputError(f"frames must be float in [0, 1], got {frames.dtype} (convert with ex4d.io.video.to_float01)")
    if depth.shape != frames.shape[:3]:
        raise InputError(f"depth {depth.shape} does not match frames {frames.shape[:3]} (need (T, H, W))")


def iter_condition(frames: Iterable[np.ndarray], depth: Iterable[np.ndarray], K_src, trajectory: Trajectory, *,
                   size: tuple[int, int], num_frames: int, cap: str = "none", filter: str = "angle",
                   stretch_test: bool = False, watertight: bool = True, only_first_frame: bool = False,
                   device="cpu", progress: Callable[[Iterable], Iterable] | None = None,
                   mesh_callback: Callable[[int, object], None] | None = None,
                   antialias: bool | str = True, border_depth: float | None = None,
                   pixel_convention: str = "centers", settings: dict | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`render_condition` one frame at a time: memory does not grow with the frame count.

    frames / depth: iterables of (H, W, 3) float [0, 1] and (H, W) z-depth frames, consumed in order
    (``num_frames`` of each; only frame 0 with ``only_first_frame``). size: (H, W).
    Yields (color (H, W, 3) float32, mask (H, W) bool) for each of the trajectory's frames; fills
    ``settings`` (if given) with the options used once the renderer is ready.
    Other arguments: see :func:`render_condition`.
    """
    from ex4d.conventions import REFERENCE_BORDER_DEPTH, reference_intrinsics
    from ex4d.mesh.dwmesh import build_dw_mesh
    from ex4d.render.rasterizer import MeshRenderer, check_pixel_convention

    height, width = (int(v) for v in size)
    num_src = int(num_frames)
    num_out = trajectory.num_frames
    if num_out < 1:
        raise InputError("the trajectory has no frames")
    if not only_first_frame and num_out != num_src:
        raise InputError(f"trajectory has {num_out} frames but the video has {num_src}; make the trajectory "
                         f"with num_frames={num_src} or use only_first_frame")
    check_pixel_convention(pixel_convention)
    K_src = reference_intrinsics(height, width) if K_src is None else np.asarray(K_src, dtype=np.float64)
    border = REFERENCE_BORDER_DEPTH if border_depth is None else float(border_depth)
    dev = resolve_device(device)
    mesh_options = dict(cap=cap, filter=filter, stretch_test=stretch_test, watertight=watertight,
                        border_depth=border)
    frames_it, depth_it = iter(frames), iter(depth)

    def next_pair(k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            frame, z = next(frames_it), next(depth_it)
        except StopIteration:
            raise InputError(f"the video or depth ended at frame {k} of {num_src}") from None
        frame, z = np.asarray(frame), np.asarray(z)
        if frame.shape != (height, width, 3) or z.shape != (height, width):
            raise InputError(f"frame {k}: colour {frame.shape} / depth {z.shape} do not match the size "
                             f"{height}x{width} (need (H, W, 3) and (H, W))")
        return frame, z

    def mesh_for(frame: np.ndarray, z: np.ndarray):
        return build_dw_mesh(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(dev),
                             torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)).to(dev),
                             K_src, **mesh_options)

    def finished(render_finish: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rgba = render_finish()
        mask = np.empty((height, width), dtype=bool)
        color = np.empty((height, width, 3), dtype=np.float32)
        finish_frame(rgba, mask, color)  # in place: no (H, W, 3) temporaries per frame
        return color, mask

    steps: Iterable[int] = range(num_out)
    if progress is not None:
        steps = progress(steps)
    shared_mesh = None
    # Helper threads (CUDA_LOOP_OVERLAP) finish the last CUDA_LOOP_FINISH_THREADS frames while the next
    # one is built and drawn; their block closes inside the renderer's, so no finisher outlives it.
    workers = max(1, int(CUDA_LOOP_FINISH_THREADS))
    helper = ThreadPoolExecutor(workers, thread_name_prefix="finish frame") if _overlap_finishing(dev) else None
    pending: collections.deque[Callable[[], tuple[np.ndarray, np.ndarray]]] = collections.deque()  # in order
    with MeshRenderer(height, width, antialias=antialias, pixel_convention=pixel_convention) as renderer, \
            limited_torch_threads(1 if dev.type == "cpu" else CUDA_LOOP_TORCH_THREADS), \
            (helper or contextlib.nullcontext()):
        gl_renderer, aa_method = renderer.gl_renderer, renderer.antialias_method
        if settings is not None:
            settings.update({"cap": cap, "filter": filter, "stretch_test": bool(stretch_test),
                             "watertight": bool(watertight), "only_first_frame": bool(only_first_frame),
                             "border_depth": border, "mask_alpha_threshold": "alpha > 125/255",
                             "antialias": aa_method,
                             "pixel_centres": "integer" if pixel_convention == "centers" else "half-integer",
                             "pixel_convention": pixel_convention,
                             "renderer": f"moderngl/EGL: {gl_renderer}"})
        for k in steps:
            frame = z = None
            if k == 0 or not only_first_frame:
                frame, z = next_pair(k)
            if k == 0:
                # Frame 0 is the source frame, fully visible (reference behaviour).
                first = (np.clip(frame, 0.0, 1.0).astype(np.float32, copy=False), np.ones((height, width), bool))
            if only_first_frame:
                if shared_mesh is None:
                    shared_mesh = mesh_for(frame, z)
                mesh = shared_mesh
            elif k == 0 and mesh_callback is None:
                mesh = None  # frame 0 is the source itself; its mesh is only needed for the callback
            else:
                mesh = mesh_for(frame, z)
            if mesh is not None and mesh_callback is not None and (not only_first_frame or k == 0):
                mesh_callback(k, mesh)
            if k == 0:
                get_frame = lambda: first  # noqa: E731 (first is set once, at k == 0)
            else:
                render_finish = renderer.render_deferred(mesh, trajectory.cam_from_world[k], trajectory.K[k])
                get_frame = (helper.submit(finished, render_finish).result if helper is not None
                             else functools.partial(finished, render_finish))
            del mesh
            if helper is None:
                yield get_frame()
                continue
            pending.append(get_frame)
            if len(pending) > workers:  # every thread is busy: hand out the oldest frame first
                yield pending.popleft()()
        while pending:
            yield pending.popleft()()
    logger.info("rendered %d condition frames at %dx%d with %s (%s), cap=%s, pixels=%s", num_out, height, width,
                gl_renderer, aa_method, cap, pixel_convention)
