"""Procedural scenes with analytic ground truth: source clips, exact depth, novel views, visibility.

The world frame is the source camera (OpenCV: x right, y down, z forward); the source camera is
the identity in every frame (a static camera; the ``spheres_moving`` scene moves its objects).
Scenes sit at the depths that the reference's depth normalisation gives a real clip: the nearest
surface at z ~ 2.6-3 (the reference maps the nearest point to 2.56) and a back wall at z = 12,
everything well inside the DW-Mesh border depth z = 100. Geometry is fixed in world units, so with
the reference's f = 500 px a small image sees the centre of the same scene (at 64x64 the field of
view is 7.3 degrees, at 512x512 it is 54 degrees); every scene has a depth edge near the optical
axis so that even tiny test sizes see a disocclusion.

Public API (shapes: T frames, H, W):

* :func:`get_scene`, :data:`SCENES` -- named scenes ``planes``, ``boxes``, ``spheres_moving``.
* :func:`render_view` -- rgb / depth / hit / points of any camera at any frame.
* :func:`make_example` -- a source :class:`~ex4d.types.Clip` and its exact :class:`~ex4d.types.DepthVideo`.
* :func:`observability` -- is the surface a target pixel sees also seen by the source camera?
* :func:`render_ground_truth` -- ground-truth novel views and visibility along a trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ex4d.conventions import invert_rigid, pixel_rays, project_points, reference_intrinsics
from ex4d.errors import InputError
from ex4d.synthetic.primitives import Box, Plane, Primitive, Sphere, Texture, shade
from ex4d.types import Clip, DepthVideo

#: Colour of pixels whose ray hits nothing (only possible in novel views looking away).
BACKGROUND = np.array([0.0, 0.0, 0.0])

#: Period, in frames, of the motion in dynamic scenes (one cycle over the reference's 49 frames).
MOTION_PERIOD = 48


@dataclass
class Scene:
    """A named list of primitives. ``dynamic`` is True when some primitive moves."""

    name: str
    primitives: list[Primitive] = field(default_factory=list)
    description: str = ""

    @property
    def dynamic(self) -> bool:
        return any(np.any(p.offset(k) != 0) for p in self.primitives for k in (0, 7, 13))

    def cast(self, origin: np.ndarray, direction: np.ndarray, frame_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """First hits of rays -> (t (N,) with +inf on a miss, primitive index (N,), -1 on a miss).

        origin: (3,) shared by all rays, or (N, 3). direction: (N, 3).
        """
        best_t = np.full(len(direction), np.inf)
        best_id = np.full(len(direction), -1, dtype=np.int64)
        for index, primitive in enumerate(self.primitives):
            t = primitive.intersect(origin, direction, frame_index)
            closer = t < best_t
            best_t = np.where(closer, t, best_t)
            best_id = np.where(closer, index, best_id)
        return best_t, best_id


# ---------------------------------------------------------------------------------------------
# The named scenes


def _room() -> list[Primitive]:
    """Back wall (z = 12) and floor (y = 1.5, i.e. 1.5 below the camera), both unbounded."""
    wall = Plane(axis=2, position=12.0, normal_sign=-1.0, name="wall",
                 texture=Texture("checker", 0.6, (0.85, 0.8, 0.65), (0.35, 0.45, 0.7), gradient=9.0))
    floor = Plane(axis=1, position=1.5, normal_sign=-1.0, name="floor",
                  texture=Texture("stripes", 0.4, (0.75, 0.75, 0.7), (0.3, 0.25, 0.2), direction=(1, 0, 1),
                                  gradient=5.0))
    return [wall, floor]


def _planes() -> Scene:
    return Scene("planes", _room() + [
        Plane(axis=2, position=3.0, bounds=((-1.5, 0.08), (-0.9, 1.5)), name="near panel",
              texture=Texture("checker", 0.12, (0.95, 0.3, 0.25), (0.95, 0.85, 0.3), gradient=1.7)),
        Plane(axis=2, position=6.5, bounds=((-0.3, 2.5), (-1.2, 0.4)), name="sign",
              texture=Texture("stripes", 0.15, (0.2, 0.7, 0.35), (0.9, 0.95, 0.9), direction=(1, 1, 0),
                              gradient=2.3)),
        Plane(axis=0, position=1.0, bounds=((0.3, 1.5), (4.0, 8.0)), normal_sign=-1.0, name="side panel",
              texture=Texture("checker", 0.2, (0.3, 0.3, 0.9), (0.8, 0.8, 0.95), gradient=2.9)),
    ], "fronto-parallel and side-on rectangles in front of a wall and a floor")


def _boxes() -> Scene:
    return Scene("boxes", _room() + [
        Box(lo=(-1.1, -0.15, 2.8), hi=(0.1, 1.5, 3.8), name="near box",
            texture=Texture("checker", 0.1, (0.95, 0.35, 0.2), (0.98, 0.9, 0.55), gradient=1.3)),
        Box(lo=(0.5, 0.4, 5.5), hi=(1.6, 1.5, 6.6), name="right box",
            texture=Texture("stripes", 0.12, (0.2, 0.6, 0.3), (0.85, 0.95, 0.8), direction=(1, 2, 0.5))),
        Box(lo=(-2.4, -1.6, 8.0), hi=(-1.6, 1.5, 8.8), name="pillar",
            texture=Texture("checker", 0.2, (0.5, 0.3, 0.6), (0.9, 0.8, 0.95), gradient=2.0)),
        Box(lo=(0.35, -0.9, 4.2), hi=(0.95, -0.3, 4.8), name="floating cube",
            texture=Texture("checker", 0.1, (0.15, 0.5, 0.85), (0.95, 0.95, 0.3), gradient=1.1)),
        # A thin post near the pivot: thin foreground structures are where a torn mesh leaks
        # (a novel ray slips behind the post's front face and shows the background).
        Box(lo=(0.2, -0.5, 2.6), hi=(0.3, 1.5, 3.2), name="post",
            texture=Texture("stripes", 0.08, (0.9, 0.9, 0.95), (0.1, 0.3, 0.6), direction=(0, 1, 0))),
    ], "axis-aligned boxes and a thin post on a floor in front of a wall")


def _wave(frame_index: int, phase: float = 0.0) -> float:
    return math.sin(2.0 * math.pi * frame_index / MOTION_PERIOD + phase)


def _spheres_moving() -> Scene:
    return Scene("spheres_moving", _room() + [
        Sphere(center=(-0.35, 0.2, 3.3), radius=0.55, name="near sphere (sways left-right)",
               motion=lambda k: np.array([0.5 * _wave(k), 0.0, 0.0]),
               texture=Texture("checker", 0.12, (0.95, 0.4, 0.3), (0.98, 0.95, 0.7), gradient=1.2)),
        Sphere(center=(1.1, 1.05, 6.0), radius=0.45, name="bouncing sphere",
               motion=lambda k: np.array([0.0, -0.9 * abs(_wave(k)), 0.0]),
               texture=Texture("stripes", 0.1, (0.2, 0.5, 0.9), (0.9, 0.95, 1.0), direction=(1, 1, 1))),
        Sphere(center=(-1.6, 0.8, 7.5), radius=0.7, name="sphere moving in depth",
               motion=lambda k: np.array([0.0, 0.0, 1.5 * _wave(k, 1.0)]),
               texture=Texture("checker", 0.18, (0.3, 0.75, 0.35), (0.9, 0.9, 0.4), gradient=2.1)),
        Sphere(center=(0.42, -0.3, 3.1), radius=0.18, name="small bobbing sphere",
               motion=lambda k: np.array([0.0, 0.15 * _wave(k, 2.0), 0.0]),
               texture=Texture("checker", 0.06, (0.95, 0.95, 0.95), (0.1, 0.55, 0.45), gradient=0.9)),
        Box(lo=(-1.6, -1.7, 9.0), hi=(-0.4, -0.5, 10.0), name="static floating box",
            texture=Texture("checker", 0.2, (0.6, 0.3, 0.6), (0.95, 0.85, 0.95))),
    ], "four moving spheres (sideways, bouncing, bobbing, in depth) and a static box")


#: Named scene builders. ``spheres_moving`` is the dynamic one.
SCENES: dict[str, Callable[[], Scene]] = {"planes": _planes, "boxes": _boxes, "spheres_moving": _spheres_moving}


def get_scene(scene: str | Scene) -> Scene:
    """A :class:`Scene` from its name (see :data:`SCENES`), or ``scene`` itself if already one."""
    if isinstance(scene, Scene):
        return scene
    if scene not in SCENES:
        raise InputError(f"unknown scene {scene!r}; choose one of {', '.join(SCENES)}")
    return SCENES[scene]()


# ---------------------------------------------------------------------------------------------
# Rendering


def _check_camera(cam_from_world, K, size) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    cam_from_world = np.asarray(cam_from_world, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    if cam_from_world.shape != (4, 4):
        raise InputError(f"cam_from_world must be (4, 4), got {cam_from_world.shape}")
    if K.shape != (3, 3):
        raise InputError(f"K must be (3, 3), got {K.shape}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise InputError(f"size must be (H, W) with H, W >= 1, got {size}")
    return cam_from_world, K, (height, width)


def render_view(scene: str | Scene, frame_index: int, cam_from_world: np.ndarray, K: np.ndarray,
                size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray-cast one view of ``scene`` at ``frame_index`` through integer pixel centres.

    cam_from_world: (4, 4) OpenCV world -> camera. K: (3, 3). size: (H, W).
    Returns a dict: ``rgb`` float32 (H, W, 3) in [0, 1]; ``depth`` float32 (H, W) z-depth in this
    camera (+inf where nothing is hit); ``hit`` bool (H, W); ``points`` float64 (H, W, 3) world
    points (nan where nothing is hit); ``primitive`` int64 (H, W) index into
    ``scene.primitives`` (-1 on a miss).
    """
    scene = get_scene(scene)
    cam_from_world, K, (height, width) = _check_camera(cam_from_world, K, size)
    world_from_cam = invert_rigid(cam_from_world)
    # Directions with camera-z component 1, so that the hit parameter t is the z-depth.
    direction = pixel_rays(height, width, K).reshape(-1, 3) @ world_from_cam[:3, :3].T
    t, primitive_id = scene.cast(world_from_cam[:3, 3], direction, frame_index)
    hit = np.isfinite(t)
    with np.errstate(invalid="ignore"):
        points = world_from_cam[:3, 3] + np.where(hit, t, np.nan)[:, None] * direction
    rgb = np.empty(direction.shape)
    rgb[:] = BACKGROUND
    for index, primitive in enumerate(scene.primitives):
        sel = np.flatnonzero(primitive_id == index)
        if len(sel):
            albedo, normal = primitive.surface(points[sel], frame_index)
            rgb[sel] = shade(albedo, normal)
    return {
        "rgb": rgb.reshape(height, width, 3).astype(np.float32),
        "depth": t.reshape(height, width).astype(np.float32),
        "hit": hit.reshape(height, width),
        "points": points.reshape(height, width, 3),
        "primitive": primitive_id.reshape(height, width),
    }


def visible_from_source(scene: str | Scene, frame_index: int, points: np.ndarray, K_src: np.ndarray,
                        size_src: tuple[int, int], rtol: float = 1e-3) -> np.ndarray:
    """Which world points (..., 3) the identity source camera sees at ``frame_index`` -> bool (...).

    A point is seen when it is in front of the camera, projects inside the span of the source's
    pixel centres (``0 <= x <= W-1``, ``0 <= y <= H-1``: the area a per-pixel depth map, and so a
    DW-Mesh, covers) and the first hit of the source ray through it lies at its depth within a
    relative tolerance ``rtol``. The ray is cast through the exact projection (not the nearest
    pixel), so the answer does not depend on the source resolution beyond the image bounds.
    Non-finite points (misses) are not seen.
    """
    scene = get_scene(scene)
    height, width = (int(s) for s in size_src)
    shape = points.shape[:-1]
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    finite = np.isfinite(points).all(axis=1)
    z = np.where(finite, points[:, 2], -1.0)
    seen = finite & (z > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = project_points(np.where(seen[:, None], points, [0.0, 0.0, 1.0]), K_src)
    eps = 1e-6  # pixels: a point re-projected onto a border pixel centre lands within rounding of it
    seen &= (xy[:, 0] >= -eps) & (xy[:, 0] <= width - 1 + eps) & (xy[:, 1] >= -eps) & (xy[:, 1] <= height - 1 + eps)
    if seen.any():
        direction = points[seen] / z[seen, None]  # camera-z component 1: t is the source z-depth
        t, _ = scene.cast(np.zeros_like(direction), direction, frame_index)
        ok = np.abs(t - z[seen]) <= rtol * z[seen]
        seen[np.flatnonzero(seen)[~ok]] = False
    return seen.reshape(shape)


def observability(scene: str | Scene, frame_index: int, cam_from_world: np.ndarray, K: np.ndarray,
                  size: tuple[int, int], K_src: np.ndarray | None = None,
                  size_src: tuple[int, int] | None = None, rtol: float = 1e-3) -> np.ndarray:
    """bool (H, W): does the surface seen at each target pixel also appear in the source view?

    The source camera is the identity at the same ``frame_index`` (the scene may have moved).
    ``K_src`` defaults to the reference intrinsics of ``size_src``, which defaults to ``size``.
    Pixels whose ray hits nothing are False. See :func:`visible_from_source` for the test.
    """
    size_src = tuple(size) if size_src is None else tuple(size_src)
    K_src = reference_intrinsics(*size_src) if K_src is None else np.asarray(K_src, dtype=np.float64)
    view = render_view(scene, frame_index, cam_from_world, K, size)
    return visible_from_source(scene, frame_index, view["points"], K_src, size_src, rtol)


def make_example(scene: str | Scene = "boxes", num_frames: int = 49, size: tuple[int, int] = (256, 256),
                 fps: float = 15.0, progress: Callable[[Iterable], Iterable] | None = None
                 ) -> tuple[Clip, DepthVideo]:
    """Render the source clip (T, H, W, 3) and its exact z-depth (T, H, W) from the identity camera.

    K is :func:`ex4d.conventions.reference_intrinsics` (f = 500, principal point (W/2, H/2)).
    ``progress``: optional ``callable(iterable) -> iterable`` (e.g. a tqdm bar) over frames.
    """
    scene = get_scene(scene)
    if int(num_frames) < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    height, width = (int(s) for s in size)
    K = reference_intrinsics(height, width)
    frames = np.empty((num_frames, height, width, 3), np.float32)
    depth = np.empty((num_frames, height, width), np.float32)
    valid = np.empty((num_frames, height, width), bool)
    indices = range(num_frames) if progress is None else progress(range(num_frames))
    for k in indices:
        view = render_view(scene, k, np.eye(4), K, (height, width))
        frames[k], valid[k] = view["rgb"], view["hit"]
        # Every source ray hits the unbounded back wall; keep depth finite regardless.
        depth[k] = np.where(view["hit"], view["depth"], 100.0)
    label = f"synthetic:{scene.name}"
    settings = {"scene": scene.name, "num_frames": int(num_frames), "size": [height, width], "exact": True}
    return (Clip(frames=frames, fps=float(fps), source=label),
            DepthVideo(depth=depth, valid=valid, K=K, estimator=label, settings=settings))


@dataclass
class GroundTruth:
    """Ground-truth novel views along a trajectory (T frames, target size H x W).

    rgb float32 (T, H, W, 3); depth float32 (T, H, W) (+inf on a miss); hit bool (T, H, W);
    observable bool (T, H, W) (see :func:`observability`).
    """

    rgb: np.ndarray
    depth: np.ndarray
    hit: np.ndarray
    observable: np.ndarray


def render_ground_truth(scene: str | Scene, cam_from_world: np.ndarray, K: np.ndarray, size: tuple[int, int],
                        K_src: np.ndarray | None = None, size_src: tuple[int, int] | None = None,
                        frames: Iterable[int] | None = None,
                        progress: Callable[[Iterable], Iterable] | None = None) -> GroundTruth:
    """Ground-truth views for cameras ``cam_from_world`` (T, 4, 4) with K (3, 3) or (T, 3, 3).

    Camera k is rendered at scene frame k. ``frames`` restricts which k are rendered (others stay
    zero / False / inf). A :class:`~ex4d.types.Trajectory` gives ``trajectory.cam_from_world`` and
    ``trajectory.K``.
    """
    scene = get_scene(scene)
    cam_from_world = np.asarray(cam_from_world, dtype=np.float64)
    if cam_from_world.ndim != 3 or cam_from_world.shape[1:] != (4, 4):
        raise InputError(f"cam_from_world must be (T, 4, 4), got {cam_from_world.shape}")
    num = len(cam_from_world)
    K = np.asarray(K, dtype=np.float64)
    K_all = np.broadcast_to(K, (num, 3, 3)) if K.shape == (3, 3) else K
    height, width = (int(s) for s in size)
    size_src = (height, width) if size_src is None else tuple(size_src)
    K_src = reference_intrinsics(*size_src) if K_src is None else np.asarray(K_src, dtype=np.float64)
    out = GroundTruth(rgb=np.zeros((num, height, width, 3), np.float32),
                      depth=np.full((num, height, width), np.inf, np.float32),
                      hit=np.zeros((num, height, width), bool), observable=np.zeros((num, height, width), bool))
    indices = list(range(num) if frames is None else frames)
    for k in (indices if progress is None else progress(indices)):
        view = render_view(scene, k, cam_from_world[k], K_all[k], (height, width))
        out.rgb[k], out.depth[k], out.hit[k] = view["rgb"], view["depth"], view["hit"]
        out.observable[k] = visible_from_source(scene, k, view["points"], K_src, size_src)
    return out
