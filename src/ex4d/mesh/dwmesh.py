"""Depth -> DW-Mesh (depth watertight mesh), vectorised in torch (CPU or CUDA).

One vertex per pixel, two triangles per 2x2 pixel block, optional closing "cap" faces, and a
per-face validity test whose failures black out (RGBA = 0) every vertex of the face instead of
deleting it. A renderer therefore always hits *some* surface, and regions whose colour was never
observed come out with alpha 0 (mask 0, "to be generated").

Reference behaviour reproduced here (see ``docs/conventions.md`` and the EX-4D spec, section 4):

* the outer one-pixel ring of the depth map is pushed to ``z = border_depth`` (100), which makes
  the faces between ring 0 and ring 1 four side walls along the frustum planes; the min-angle test
  always fails on them, so the outer 2-pixel frame of every novel view is masked;
* rays through *integer* pixel coordinates, ``ray(u, v) = ((u - cx)/fx, (v - cy)/fy, 1)``, vertex
  ``= z * ray`` (z-depth, OpenCV camera frame of the source frame, which is the world frame);
* face order: all T1 = (i(r+1,c), i(r,c), i(r,c+1)), then all T2 = (i(r+1,c), i(r,c+1),
  i(r+1,c+1)), then the cap faces (W-1, 0, HW-1) and (HW-1, 0, (H-1)W) if any;
* "angle" filter: a face is valid iff its smallest interior angle is >= 2.5 degrees (a depth jump
  of more than ~4.58 % between neighbouring pixels at f = 500 fails it).

Cap modes (written into every file this module or the renderer produces, via ``DWMesh.cap``):

* ``"none"`` -- no cap faces. What produced the reference's shipped example outputs and most
  probably its training data. Default.
* ``"masked"`` -- the two cap faces are present and always invalid, so the back wall at
  ``z = border_depth`` (and everything behind it) is mask 0.
* ``"reference"`` -- the cap faces go through the validity test like any other face, exactly as the
  reference code at HEAD does. Only the top-right and bottom-left corners end up flagged (they
  touch wall faces); the top-left and bottom-right corners keep their colour, so the cap renders as
  a smeared two-colour blend that the mask calls visible. Kept for bit-level comparisons only.

Because the grid topology never changes for a given size, the faces are built once per
``(H, W, cap, device)`` and cached; per frame only vertices and colours are computed.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ex4d.conventions import REFERENCE_BORDER_DEPTH, reference_intrinsics
from ex4d.errors import InputError

logger = logging.getLogger(__name__)

CAP_MODES = ("none", "masked", "reference")
FILTERS = ("angle", "boundary")

#: The reference's dead stretch test threshold (proj_max / z_range), live here with stretch_test=True.
STRETCH_THRESHOLD = 0.013
#: The "boundary" filter's threshold on max|dz| / max(max|dx|, max|dy|).
BOUNDARY_THRESHOLD = 2.0


@dataclass
class DWMesh:
    """One frame's DW-Mesh.

    vertices: (V, 3) float32, V = H*W, row-major (index = v*W + u), in the OpenCV camera frame of
        its source frame (= world).
    colors: (V, 4) float32 RGBA in [0, 1]; (0, 0, 0, 0) on flagged vertices.
    faces: (F, 3) int32, reference order (all T1, all T2, then cap faces if any).
    face_valid: (F,) bool, the validity test's result (all True after a torn-mesh deletion).
    cap: "none" | "masked" | "reference".
    settings: how it was built (filter, watertight, stretch_test, thresholds), for file metadata.
    """

    vertices: torch.Tensor
    colors: torch.Tensor
    faces: torch.Tensor
    face_valid: torch.Tensor
    cap: str
    settings: dict = field(default_factory=dict)

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def flagged(self) -> torch.Tensor:
        """(V,) bool, True where the vertex was blacked out (alpha 0)."""
        return self.colors[:, 3] == 0


def grid_faces(height: int, width: int, cap: str = "none", device: str | torch.device = "cpu") -> torch.Tensor:
    """Face topology (F, 3) int32 of an H x W pixel grid in the reference's order; cached.

    F = 2(H-1)(W-1), plus 2 cap faces unless ``cap == "none"``. The returned tensor is shared:
    do not modify it in place.
    """
    if cap not in CAP_MODES:
        raise InputError(f"unknown cap mode {cap!r}; use one of {', '.join(CAP_MODES)}")
    return _grid_faces_cached(int(height), int(width), cap != "none", str(torch.device(device)))


@functools.lru_cache(maxsize=8)
def _grid_faces_cached(height: int, width: int, with_cap: bool, device: str) -> torch.Tensor:
    idx = torch.arange(height * width, dtype=torch.int32, device=device).view(height, width)
    tl, tr = idx[:-1, :-1], idx[:-1, 1:]
    bl, br = idx[1:, :-1], idx[1:, 1:]
    t1 = torch.stack([bl, tl, tr], dim=-1).reshape(-1, 3)
    t2 = torch.stack([bl, tr, br], dim=-1).reshape(-1, 3)
    parts = [t1, t2]
    if with_cap:
        hw = height * width
        parts.append(torch.tensor([[width - 1, 0, hw - 1], [hw - 1, 0, (height - 1) * width]],
                                  dtype=torch.int32, device=device))
    return torch.cat(parts, dim=0).contiguous()


def _as_tensor(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"{name} must be floating point (depth in scene units, colours in [0, 1]), got {x.dtype}")
    return x.to(device=device if device is not None else x.device, dtype=torch.float32)


def _intrinsics(K, height: int, width: int) -> tuple[float, float, float, float, float]:
    K = reference_intrinsics(height, width) if K is None else K
    K = K.detach().cpu().double().numpy() if isinstance(K, torch.Tensor) else np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"intrinsics K must be a finite (3, 3) matrix with positive focal lengths, got {K.tolist()}")
    return float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), float(K[0, 1])


def _min_angle_ok(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cos_limit: float) -> torch.Tensor:
    """(...,) bool: smallest interior angle of triangles (a, b, c) (..., 3) >= the limit.

    Compares cosines (largest cosine = smallest angle) instead of calling acos. A degenerate face
    (a zero-length edge) gives NaN and so counts as invalid, as the reference's angle test does.
    """
    ab, ac, bc = b - a, c - a, c - b
    lab, lac, lbc = ab.norm(dim=-1), ac.norm(dim=-1), bc.norm(dim=-1)
    cos_a = (ab * ac).sum(-1) / (lab * lac)
    cos_b = -(ab * bc).sum(-1) / (lab * lbc)
    cos_c = (ac * bc).sum(-1) / (lac * lbc)
    cos_max = torch.maximum(torch.maximum(cos_a, cos_b), cos_c)
    return cos_max <= cos_limit


def _edge_extent(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(..., 3): per axis, the largest |delta| over the triangle's three edges."""
    return torch.maximum(torch.maximum((b - a).abs(), (c - a).abs()), (c - b).abs())


def _face_validity(a, b, c, *, filter: str, cos_limit: float, stretch_test: bool, z_range) -> torch.Tensor:
    if filter == "angle":
        valid = _min_angle_ok(a, b, c, cos_limit)
    else:  # "boundary": steep faces (depth changes faster than the image-plane extent) are invalid
        ext = _edge_extent(a, b, c)
        valid = ~(ext[..., 2] / (torch.maximum(ext[..., 0], ext[..., 1]) + 1e-8) > BOUNDARY_THRESHOLD)
    if stretch_test:
        proj_max = _edge_extent(a, b, c).amax(dim=-1)
        valid = valid & (proj_max / z_range < STRETCH_THRESHOLD)
    return valid


def _grid_validity(xyz, *, filter: str, cos_limit: float, stretch_test: bool, z_range):
    """Validity (H-1, W-1) of all T1 and all T2 faces from the vertex grid planes X, Y, Z (H, W).

    Works on the shared grid edges (top/bottom horizontal, left/right vertical, the bl->tr
    diagonal) as contiguous 2-D planes per axis, which is several times faster than gathering
    (F, 3, 3) corner tensors. T1 = (bl, tl, tr), T2 = (bl, tr, br).
    """
    horiz = [p[:, 1:] - p[:, :-1] for p in xyz]      # (H, W-1): vertex (r, c) -> (r, c+1)
    vert = [p[1:, :] - p[:-1, :] for p in xyz]       # (H-1, W): vertex (r, c) -> (r+1, c)
    top = [e[:-1] for e in horiz]                    # tl -> tr
    bottom = [e[1:] for e in horiz]                  # bl -> br
    left = [e[:, :-1] for e in vert]                 # tl -> bl
    right = [e[:, 1:] for e in vert]                 # tr -> br
    diag = [p[:-1, 1:] - p[1:, :-1] for p in xyz]    # bl -> tr

    if filter == "angle":
        def dot(a, b):
            return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]

        n_top, n_bottom = dot(top, top).sqrt(), dot(bottom, bottom).sqrt()
        n_left, n_right, n_diag = dot(left, left).sqrt(), dot(right, right).sqrt(), dot(diag, diag).sqrt()
        # Cosines of the interior angles; the largest cosine is the smallest angle. Zero-length
        # edges give NaN, which fails the <= test: degenerate faces are invalid, as in the reference.
        cos1 = torch.maximum(torch.maximum(dot(left, top) / (n_left * n_top),           # at tl
                                           -dot(left, diag) / (n_left * n_diag)),       # at bl
                             dot(top, diag) / (n_top * n_diag))                         # at tr
        cos2 = torch.maximum(torch.maximum(dot(bottom, right) / (n_bottom * n_right),   # at br
                                           dot(diag, bottom) / (n_diag * n_bottom)),    # at bl
                             -dot(diag, right) / (n_diag * n_right))                    # at tr
        valid1, valid2 = cos1 <= cos_limit, cos2 <= cos_limit
    ext1 = ext2 = None
    if filter == "boundary" or stretch_test:
        ext1 = [torch.maximum(torch.maximum(t.abs(), l_.abs()), d.abs()) for t, l_, d in zip(top, left, diag)]
        ext2 = [torch.maximum(torch.maximum(b.abs(), r.abs()), d.abs()) for b, r, d in zip(bottom, right, diag)]
    if filter == "boundary":
        valid1 = ~(ext1[2] / (torch.maximum(ext1[0], ext1[1]) + 1e-8) > BOUNDARY_THRESHOLD)
        valid2 = ~(ext2[2] / (torch.maximum(ext2[0], ext2[1]) + 1e-8) > BOUNDARY_THRESHOLD)
    if stretch_test:
        valid1 = valid1 & (torch.maximum(torch.maximum(ext1[0], ext1[1]), ext1[2]) / z_range < STRETCH_THRESHOLD)
        valid2 = valid2 & (torch.maximum(torch.maximum(ext2[0], ext2[1]), ext2[2]) / z_range < STRETCH_THRESHOLD)
    return valid1, valid2


def build_dw_mesh(depth, rgb, K=None, *, cap: str = "none", filter: str = "angle", stretch_test: bool = False,
                  watertight: bool = True, border_depth: float = REFERENCE_BORDER_DEPTH,
                  min_angle_deg: float = 2.5) -> DWMesh:
    """Build one frame's DW-Mesh on ``depth``'s device.

    depth: (H, W) z-depth (torch or numpy), > 0 and finite inside the border ring.
    rgb: (H, W, 3) float colours in [0, 1].
    K: (3, 3) intrinsics of the source view; None -> the reference's f = 500, c = (W/2, H/2).
    cap: "none" | "masked" | "reference" (see the module docstring).
    filter: "angle" (min interior angle >= ``min_angle_deg``) or "boundary"
        (max|dz| / (max(max|dx|, max|dy|) + 1e-8) > 2 is invalid).
    stretch_test: also require proj_max / z_range < 0.013 (dead code in the reference, live here).
    watertight: True (DW-Mesh): keep every face, zero the RGBA of every vertex of an invalid face.
        False (torn-mesh baseline): delete invalid faces, keep colours; the "boundary" filter
        still zeroes vertices and keeps faces, as in the reference.
    border_depth: z of the pushed one-pixel border ring (None or <= 0 disables the push).

    Returns a :class:`DWMesh` with V = H*W vertices and F = 2(H-1)(W-1) (+2 with a cap) faces
    (fewer when torn).
    """
    if cap not in CAP_MODES:
        raise InputError(f"unknown cap mode {cap!r}; use one of {', '.join(CAP_MODES)}")
    if filter not in FILTERS:
        raise InputError(f"unknown mesh filter {filter!r}; use one of {', '.join(FILTERS)}")
    depth = _as_tensor(depth, "depth")
    if depth.ndim != 2 or depth.shape[0] < 3 or depth.shape[1] < 3:
        raise InputError(f"depth must be (H, W) with H, W >= 3, got {tuple(depth.shape)}")
    height, width = depth.shape
    rgb = _as_tensor(rgb, "rgb", depth.device)
    if tuple(rgb.shape) != (height, width, 3):
        raise InputError(f"rgb must be (H, W, 3) = ({height}, {width}, 3) to match the depth, got {tuple(rgb.shape)}")
    fx, fy, cx, cy, skew = _intrinsics(K, height, width)
    device = depth.device

    z = depth.clone()
    if border_depth is not None and border_depth > 0:
        z[0, :] = border_depth
        z[-1, :] = border_depth
        z[:, 0] = border_depth
        z[:, -1] = border_depth
    # Input check as a device-side flag, read once at the end: on a GPU the host then waits once,
    # after every kernel of the build has been queued, instead of stalling the queue mid-build.
    depth_ok = torch.isfinite(z).all() & (z > 0).all()

    # Rays at integer pixel coordinates (reference convention), float32 as in the reference.
    u = torch.arange(width, device=device, dtype=torch.float32)
    v = torch.arange(height, device=device, dtype=torch.float32)
    ray_y = ((v - cy) / fy)[:, None].expand(height, width)
    ray_x = ((u[None, :] - cx) - skew * ray_y) / fx

    cos_limit = math.cos(math.radians(min_angle_deg))
    z_range = z.max() - z.min() if stretch_test else None
    opts = dict(filter=filter, cos_limit=cos_limit, stretch_test=stretch_test, z_range=z_range)
    x, y = z * ray_x, z * ray_y
    valid_t1, valid_t2 = _grid_validity((x, y, z), **opts)  # (H-1, W-1) each
    vertices = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # (V, 3)
    cap_valid = None
    if cap == "masked":
        cap_valid = torch.zeros(2, dtype=torch.bool, device=device)
    elif cap == "reference":
        corners = vertices[[width - 1, 0, height * width - 1, (height - 1) * width]]
        tr_c, tl_c, br_c, bl_c = corners[0], corners[1], corners[2], corners[3]
        cap_valid = _face_validity(torch.stack([tr_c, br_c]), torch.stack([tl_c, tl_c]),
                                   torch.stack([br_c, bl_c]), **opts)

    face_valid = torch.cat([valid_t1.reshape(-1), valid_t2.reshape(-1)]
                           + ([cap_valid] if cap_valid is not None else []))
    faces = grid_faces(height, width, cap, device)
    colors = torch.cat([rgb.reshape(-1, 3), torch.ones(height * width, 1, device=device)], dim=1)

    zero_vertices = watertight or filter == "boundary"
    if zero_vertices:
        flag = _flag_vertices(~valid_t1, ~valid_t2)
        flag = flag.reshape(-1)
        if cap_valid is not None:
            cap_bad = ~cap_valid
            # Cap faces (W-1, 0, HW-1) and (HW-1, 0, (H-1)W): OR their flags into the corners.
            flag[width - 1] |= cap_bad[0]
            flag[0] |= cap_bad[0] | cap_bad[1]
            flag[height * width - 1] |= cap_bad[0] | cap_bad[1]
            flag[(height - 1) * width] |= cap_bad[1]
        colors = colors * (~flag).unsqueeze(1).to(colors.dtype)
    if not watertight and filter == "angle":
        faces = faces[face_valid]
        face_valid = torch.ones(faces.shape[0], dtype=torch.bool, device=device)

    if not bool(depth_ok):
        raise InputError("depth has non-finite or non-positive values; z-depth must be > 0 everywhere "
                         "(fill holes before meshing)")
    settings = {"cap": cap, "filter": filter, "stretch_test": bool(stretch_test), "watertight": bool(watertight),
                "border_depth": border_depth, "min_angle_deg": float(min_angle_deg),
                "intrinsics": [fx, fy, cx, cy],
                # Faces are exactly grid_faces(H, W, cap) (renderers may exploit the known adjacency).
                "grid_size": [height, width] if faces is grid_faces(height, width, cap, device) else None}
    return DWMesh(vertices=vertices, colors=colors, faces=faces, face_valid=face_valid, cap=cap,
                  settings=settings)


def _flag_vertices(bad_t1: torch.Tensor, bad_t2: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: vertices touched by an invalid grid face, from (H-1, W-1) face maps.

    T1 of block (r, c) touches (r+1, c), (r, c), (r, c+1); T2 touches (r+1, c), (r, c+1), (r+1, c+1).
    Slicing instead of scattering keeps it deterministic and free of atomics.
    """
    h1, w1 = bad_t1.shape
    flag = torch.zeros(h1 + 1, w1 + 1, dtype=torch.bool, device=bad_t1.device)
    either = bad_t1 | bad_t2
    flag[1:, :-1] |= either          # bottom-left, shared by T1 and T2
    flag[:-1, 1:] |= either          # top-right, shared by T1 and T2
    flag[:-1, :-1] |= bad_t1         # top-left, T1 only
    flag[1:, 1:] |= bad_t2           # bottom-right, T2 only
    return flag


def export_ply(mesh: DWMesh, path) -> Path:
    """Write ``mesh`` as a binary PLY (atomically) and return the path.

    All V vertices (including the border ring at z = border_depth) and all faces (curtains and cap
    faces included) are written; vertex colours are uint8 RGB, rounded, black where flagged; alpha
    is written as 255 (the reference drops it). trimesh is used with ``process=False`` so that
    no vertex is merged and colours stay aligned. A header comment records the cap mode and the
    other build settings.
    """
    import trimesh

    from ex4d.io.files import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".ply":
        raise InputError(f"mesh output must end in .ply, got {path}")
    vertices = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.detach().cpu().numpy().astype(np.int64)
    rgb = np.clip(np.rint(mesh.colors[:, :3].detach().cpu().numpy().astype(np.float64) * 255.0), 0, 255)
    rgba = np.concatenate([rgb.astype(np.uint8), np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    tm = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=rgba, process=False)
    data = trimesh.exchange.ply.export_ply(tm, encoding="binary")
    data = _add_ply_comment(data, _settings_comment(mesh))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    logger.info("wrote %s (%d vertices, %d faces, cap=%s)", path, mesh.num_vertices, mesh.num_faces, mesh.cap)
    return path


def _settings_comment(mesh: DWMesh) -> str:
    s = mesh.settings
    parts = [f"cap={mesh.cap}"] + [f"{k}={s[k]}" for k in ("filter", "watertight", "stretch_test",
                                                             "border_depth", "min_angle_deg") if k in s]
    return "ex4d DW-Mesh " + " ".join(parts)


def _add_ply_comment(data: bytes, comment: str) -> bytes:
    """Insert ``comment <text>`` right after the PLY format line (header is ASCII)."""
    first = data.index(b"\n") + 1
    second = data.index(b"\n", first) + 1
    line = ("comment " + comment.replace("\n", " ") + "\n").encode("ascii", "replace")
    return data[:second] + line + data[second:]


def read_ply_comments(path) -> list[str]:
    """The ``comment`` lines of a PLY header (e.g. to see which cap mode made a file)."""
    comments = []
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("ascii", "replace").strip()
            if line.startswith("comment "):
                comments.append(line[len("comment "):])
            if line == "end_header":
                break
    return comments
