"""Simulated visibility masks: training pairs for the adapter from monocular video alone.

At inference the generator sees the source rendered into a *novel* view, with mask 0 wherever the
novel view shows content the source never observed. For training we need the same kind of
(condition, mask, target) triple where the target is known, so the roles are swapped: the target is
the *source* video itself, and the condition is the source with the pixels removed that a novel
view could not have supplied (TrajectoryCrafter-style double reprojection).

For source frame k and novel camera k (a sampled trajectory, ``ex4d.camera``):

1. Build frame k's DW-Mesh (``ex4d.mesh.build_dw_mesh``, same settings as inference) and render it
   into the novel view with the shared rasteriser (``ex4d.render.MeshRenderer``), carrying as
   vertex attributes the vertex's z-depth *in the novel camera* and its DW-Mesh alpha. Attribute
   interpolation is perspective-correct, so each novel pixel gets the exact depth of the surface
   point it sees, and ``alpha > 125/255`` is exactly the inference mask of that pixel.
2. Bring that back to the source view: source pixel p (3-D point X_p from its depth) is
   **supplied** iff X_p projects inside the novel image, the novel pixel it lands on is visible
   (alpha test) and that pixel's rendered depth equals X_p's novel-camera depth (a z-test). This
   is shadow mapping with the novel camera as the light: every source pixel is tested, so there
   are no sampling holes when the novel view sees a surface smaller than the source does. The
   z-test tolerance is ``rel_depth_tol * z`` plus a slope term (the surface's depth change over
   one novel pixel, from the smaller one-sided difference so that depth edges do not inflate it).
3. mask_k = supplied. Frame 0 is forced fully visible (the inference contract: frame 0 is the
   source frame with mask 1).
4. Temporal coherence. The paper's authors propagated masks with CoTracker3 tracks; that tracker
   is not available here. Each frame's mask is computed from that frame's own geometry and camera,
   so it already moves with the content; what remains is flicker from per-frame depth noise,
   removed by a temporal majority vote over a window of ``temporal_window`` frames (frames >= 1
   only, so the forced frame 0 does not leak into frame 1), followed by a small spatial closing
   (``close_radius``) that fills isolated one-pixel holes where a source pixel fell exactly on a
   novel-view triangle edge. Neither filter may touch the DW-Mesh's own flags of that frame (the
   1-px lines along its depth edges and the 2-px border): inference masks them in every frame, and
   a temporal filter without motion compensation would smear them on moving objects. Measured on
   the synthetic scenes against the exact oracle (docs/training.md), the filters change the IoU by
   at most a few points either way; they are knobs (``temporal_window=1``, ``close_radius=0``
   disable them).

Shapes: T frames, H x W source size; the novel views use the trajectory's intrinsics at the same
size (as ``ex4d recon`` renders them).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch

from ex4d.conventions import reference_intrinsics
from ex4d.errors import InputError

log = logging.getLogger(__name__)

#: The inference mask threshold (render alpha > 125/255, as in the reference).
ALPHA_THRESHOLD = 125.0 / 255.0


@dataclass
class MaskSettings:
    """How simulated masks are made (saved with every pair)."""

    rel_depth_tol: float = 0.01    # z-test tolerance, relative to depth
    temporal_window: int = 3       # odd; 1 disables the temporal majority filter
    close_radius: int = 1          # spatial closing radius in pixels of the visible region; 0 disables
    cap: str = "none"              # DW-Mesh options, as at inference (ex4d recon defaults)
    filter: str = "angle"
    stretch_test: bool = False

    def validate(self) -> None:
        if self.temporal_window < 1 or self.temporal_window % 2 == 0:
            raise InputError(f"temporal window must be an odd number >= 1, got {self.temporal_window}")
        if self.close_radius < 0:
            raise InputError(f"close radius must be >= 0, got {self.close_radius}")
        if not self.rel_depth_tol > 0:
            raise InputError(f"relative depth tolerance must be > 0, got {self.rel_depth_tol}")

    def to_dict(self) -> dict:
        return asdict(self)


def source_points(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Source-camera (= world) points (H, W, 3) of a z-depth map (H, W), integer pixel centres."""
    from ex4d.conventions import pixel_rays

    height, width = depth.shape
    return pixel_rays(height, width, K) * np.asarray(depth, dtype=np.float64)[..., None]


def render_novel_depth(renderer, mesh, cam_from_world: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Render a DW-Mesh into a novel camera: per-pixel surface z-depth and inference visibility.

    renderer: an ``ex4d.render.rasterizer.MeshRenderer`` made with ``antialias=False`` (attributes
    must not be blended across edges). The novel-camera depth of each vertex is written into the
    red channel scaled into [0, 1]; alpha is the DW-Mesh's own alpha.
    Returns (depth (H, W) float64, +inf where nothing was hit; visible (H, W) bool = alpha > 125/255).
    """
    vertices = mesh.vertices.detach().to(torch.float64)
    rotation = torch.as_tensor(cam_from_world[:3, :3], dtype=torch.float64, device=vertices.device)
    translation = torch.as_tensor(cam_from_world[:3, 3], dtype=torch.float64, device=vertices.device)
    z = vertices @ rotation[2] + translation[2]
    # Scale so that every depth the renderer can show (inside its far plane) fits in [0, 1].
    scale = float(z.abs().max().clamp(min=1e-6))
    attrs = torch.zeros_like(mesh.colors)
    attrs[:, 0] = (z / scale).clamp(0, 1).to(attrs.dtype)
    attrs[:, 1] = 1.0  # coverage: 1 wherever any triangle was hit, flagged or not
    attrs[:, 3] = mesh.colors[:, 3]
    rgba = np.asarray(renderer.render(replace(mesh, colors=attrs), cam_from_world, K), dtype=np.float64)
    covered = rgba[..., 1] > 0.5
    depth = np.where(covered, rgba[..., 0] * scale, np.inf)
    visible = covered & (rgba[..., 3] > ALPHA_THRESHOLD)
    return depth, visible


def supplied_from_novel(points: np.ndarray, cam_from_world: np.ndarray, K: np.ndarray, novel_depth: np.ndarray,
                        novel_visible: np.ndarray, rel_depth_tol: float = 0.01) -> np.ndarray:
    """Which source pixels a novel view supplies: projection in bounds, visible, and passes the z-test.

    points: (H, W, 3) world points of the source pixels. cam_from_world (4, 4), K (3, 3): the novel
    camera. novel_depth (h, w): rendered surface z-depth (+inf = empty); novel_visible (h, w) bool.
    Returns (H, W) bool.
    """
    height, width = novel_depth.shape
    flat = points.reshape(-1, 3)
    cam = flat @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    z = cam[:, 2]
    front = z > 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(front, cam[:, 0] / z * K[0, 0] + K[0, 2], -1.0)
        y = np.where(front, cam[:, 1] / z * K[1, 1] + K[1, 2], -1.0)
    col, row = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside = front & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col, row = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)

    slope = _local_slope(novel_depth)
    rendered = novel_depth[row, col]
    tolerance = rel_depth_tol * z + slope[row, col]
    ok = inside & novel_visible[row, col] & (np.abs(rendered - z) <= tolerance)
    return ok.reshape(points.shape[:-1])


def _local_slope(depth: np.ndarray) -> np.ndarray:
    """Per pixel, the surface's depth change across one pixel (x plus y), ignoring depth edges.

    Uses the smaller of the forward and backward differences on each axis, so that a pixel beside a
    depth discontinuity takes the slope of its own surface; non-finite neighbours count as 0.
    """
    finite = np.where(np.isfinite(depth), depth, np.nan)
    padded = np.pad(finite, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    total = np.zeros_like(depth, dtype=np.float64)
    for forward, backward in ((padded[1:-1, 2:], padded[1:-1, :-2]), (padded[2:, 1:-1], padded[:-2, 1:-1])):
        diffs = np.stack([np.abs(forward - centre), np.abs(centre - backward)])
        diffs = np.where(np.isfinite(diffs), diffs, np.inf)
        axis_slope = diffs.min(axis=0)
        total += np.where(np.isfinite(axis_slope), axis_slope, 0.0)
    return total


def temporal_majority(masks: np.ndarray, window: int) -> np.ndarray:
    """Majority vote over ``window`` consecutive frames among frames 1..T-1; frame 0 is untouched.

    masks: (T, H, W) bool. Windows are truncated at the ends (ties keep the frame's own value).
    """
    if window <= 1 or len(masks) <= 2:
        return masks.copy()
    out = masks.copy()
    half = window // 2
    moving = masks[1:].astype(np.int32)
    count = len(moving)
    cumulative = np.concatenate([np.zeros((1, *moving.shape[1:]), np.int32), np.cumsum(moving, axis=0)])
    for k in range(count):
        lo, hi = max(0, k - half), min(count, k + half + 1)
        votes = cumulative[hi] - cumulative[lo]
        n = hi - lo
        out[k + 1] = np.where(2 * votes == n, masks[k + 1], 2 * votes > n)
    return out


def close_mask(masks: np.ndarray, radius: int) -> np.ndarray:
    """Spatial morphological closing (dilate, then erode) of the True region, per frame.

    masks: (T, H, W) bool; square structuring element of side 2*radius+1. The erosion treats
    outside-the-image as True so that closing never shrinks the mask at the borders.
    """
    if radius <= 0:
        return masks.copy()
    size = 2 * radius + 1
    x = torch.from_numpy(masks.astype(np.float32))[:, None]
    dilated = torch.nn.functional.max_pool2d(x, size, stride=1, padding=radius)
    padded = torch.nn.functional.pad(dilated, (radius,) * 4, value=1.0)
    eroded = -torch.nn.functional.max_pool2d(-padded, size, stride=1)
    return eroded[:, 0].numpy() > 0.5


def simulate_masks(depth: np.ndarray, K_src: np.ndarray | None, trajectory, settings: MaskSettings | None = None,
                   *, device: str = "cpu", renderer=None,
                   progress: Callable[[Iterable], Iterable] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Simulated masks for a source clip and a target trajectory.

    depth: (T, H, W) source z-depth. K_src: (3, 3) or None (reference intrinsics).
    trajectory: an ``ex4d.types.Trajectory`` with T cameras (novel views at the source size).
    Returns (mask (T, H, W) bool after filtering, raw (T, H, W) bool before filtering); frame 0 is
    all True in both.
    """
    from ex4d.mesh.dwmesh import build_dw_mesh

    settings = settings or MaskSettings()
    settings.validate()
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 3:
        raise InputError(f"depth must be (T, H, W), got {depth.shape}")
    num, height, width = depth.shape
    if trajectory.num_frames != num:
        raise InputError(f"the trajectory has {trajectory.num_frames} cameras but the clip has {num} frames")
    K_src = reference_intrinsics(height, width) if K_src is None else np.asarray(K_src, dtype=np.float64)
    if renderer is None:
        from ex4d.render.rasterizer import MeshRenderer

        renderer = MeshRenderer(height, width, antialias=False)
    raw = np.ones((num, height, width), dtype=bool)
    flagged = np.zeros((num, height, width), dtype=bool)
    dummy_rgb = torch.zeros(height, width, 3, device=device)
    frames = range(1, num)
    for k in (frames if progress is None else progress(frames)):
        depth_k = torch.from_numpy(depth[k]).to(device)
        mesh = build_dw_mesh(depth_k, dummy_rgb, K_src, cap=settings.cap, filter=settings.filter,
                             stretch_test=settings.stretch_test)
        novel_depth, novel_visible = render_novel_depth(renderer, mesh, trajectory.cam_from_world[k],
                                                        trajectory.K[k])
        points = mesh.vertices.detach().cpu().numpy().astype(np.float64).reshape(height, width, 3)
        flagged[k] = mesh.flagged.cpu().numpy().reshape(height, width)
        raw[k] = supplied_from_novel(points, trajectory.cam_from_world[k], trajectory.K[k], novel_depth,
                                     novel_visible, settings.rel_depth_tol)
    mask = close_mask(temporal_majority(raw, settings.temporal_window), settings.close_radius)
    # The filters must not move or erase the DW-Mesh's own flags (1-px lines along each depth edge
    # of *this* frame, the 2-px border): inference masks them in every frame, so training does too.
    mask &= ~flagged
    mask[0] = True
    return mask, raw
