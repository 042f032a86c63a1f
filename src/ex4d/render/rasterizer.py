"""Headless OpenGL rasteriser for DW-Meshes (moderngl + EGL).

One code path for both machines: Mesa llvmpipe on a CPU-only machine and the NVIDIA EGL driver on
a GPU machine. The renderer owns one EGL context, one shader program and its buffers; they are
created once and reused across frames: the index buffer is re-uploaded only when the face tensor
changes; vertices and colours travel as one interleaved (V, 7) float32 buffer, packed in one pass
into a reused host array (page-locked for CUDA meshes: one asynchronous copy, one synchronisation
per frame) and written into a GL buffer re-allocated only when V changes.

Conventions handled here and nowhere else:

* Pixel convention (``pixel_convention=``, docs/conventions.md):

  - ``"centers"`` (default, ex4d convention): pixel centres at *integer* coordinates. The vertex
    built from pixel (u, v) of the source view projects to window coordinates (u + 0.5, v + 0.5),
    the centre of OpenGL's pixel (u, v). An identity camera therefore re-renders the source exactly.
  - ``"reference"``: as the reference's nvdiffrast path, integer coordinates fall on pixel
    *corners*: (u, v) projects to window coordinates (u, v), so every render is shifted by half a
    pixel (up and left) against ``"centers"``. Offered to reproduce the reference's renders;
    not the default (a deliberate fix).
* Rows: window row y is image row v (the projection does not flip y), so the read-back array has
  row 0 = top image row without a copy.
* Projection from a general K (fx, fy, cx, cy, skew) with the reference's near 1e-3 / far 1e3.
* No face culling (the DW-Mesh's winding is not consistent with any viewing side), depth test on,
  per-vertex RGBA interpolated perspective-correctly, no blending.
* Antialiasing (``antialias=``): the reference runs nvdiffrast's ``antialias``, which leaves every
  pixel as interpolated from one centre sample except those next to a *silhouette* edge, which are
  blended with their neighbour by the edge's position. The default, ``True`` / ``"analytic"``,
  does the same on our single-sample render (:mod:`ex4d.render.antialias`): interior pixels are
  exact, masks agree with the un-antialiased coverage to ~0.01 % of pixels (the reference's own
  relation), and only ~0.2-0.4 % of pixels change. Per frame, the silhouette edges are classified
  on the mesh's device (GPU for a CUDA mesh, overlapping the draw) and only the faces that have
  one come back to the host, where only the pixel pairs showing them are blended
  (:class:`ex4d.render.antialias.SparseAntialiaser`; bit-identical to the plain
  :func:`ex4d.render.antialias.antialias_silhouettes`). ``"msaa"`` (4x MSAA, box resolve) is offered but
  not the default: without per-sample shading, MSAA evaluates every partially covering triangle's
  colour at the pixel centre (extrapolated outside the triangle), which shifts interior colours of
  textured surfaces in novel views (mean 0.047 on a noise texture) and moves the alpha > 125/255
  mask on ~0.3 % of pixels; it is also ~2x slower on llvmpipe. ``False`` / ``"none"``: no blending.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import torch

from ex4d.conventions import REFERENCE_FAR, REFERENCE_NEAR
from ex4d.errors import InputError, UserError

logger = logging.getLogger(__name__)

_VERTEX_SHADER = """
#version 330
uniform mat4 clip_from_world;
in vec3 in_position;
in vec4 in_color;
out vec4 v_color;
void main() {
    gl_Position = clip_from_world * vec4(in_position, 1.0);
    v_color = in_color;
}
"""

_FRAGMENT_SHADER = """
#version 330
in vec4 v_color;
layout(location = 0) out vec4 f_color;
layout(location = 1) out vec2 f_face;  // (face index + 1, camera depth); only for analytic AA
void main() {
    f_color = v_color;
    f_face = vec2(float(gl_PrimitiveID + 1), 1.0 / gl_FragCoord.w);
}
"""

ANTIALIAS_MODES = ("analytic", "msaa", "none")
#: "centers": integer pixel coordinates are pixel centres (default); "reference": pixel corners.
PIXEL_CONVENTIONS = ("centers", "reference")


def check_pixel_convention(pixel_convention: str) -> str:
    if pixel_convention not in PIXEL_CONVENTIONS:
        raise InputError(f"unknown pixel convention {pixel_convention!r}; use one of {', '.join(PIXEL_CONVENTIONS)} "
                         f"(docs/conventions.md)")
    return pixel_convention
#: Face ids travel through a float32 channel: exact below 2^24 faces.
_MAX_ANALYTIC_FACES = 1 << 24

MSAA_SAMPLES = 4


def clip_from_camera(K: np.ndarray, height: int, width: int, near: float = REFERENCE_NEAR,
                     far: float = REFERENCE_FAR, pixel_convention: str = "centers") -> np.ndarray:
    """(4, 4) float64 map from OpenCV camera coordinates to OpenGL clip coordinates.

    "centers": x_ndc = (2 (u + 0.5) / W) - 1 and y_ndc = (2 (v + 0.5) / H) - 1, where (u, v) are
    pixel coordinates with centres at integers. "reference": x_ndc = 2 u / W - 1 (integer
    coordinates on pixel corners, as the reference). w_clip = z (OpenCV depth); z_ndc runs from -1
    at ``near`` to +1 at ``far``. Window row v is image row v (no flip).
    """
    K = np.asarray(K, dtype=np.float64)
    fx, fy, cx, cy, skew = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
    shift = 1 if check_pixel_convention(pixel_convention) == "centers" else 0  # 2 x the half-pixel offset
    return np.array([
        [2 * fx / width, 2 * skew / width, (2 * cx + shift) / width - 1, 0.0],
        [0.0, 2 * fy / height, (2 * cy + shift) / height - 1, 0.0],
        [0.0, 0.0, (far + near) / (far - near), -2 * far * near / (far - near)],
        [0.0, 0.0, 1.0, 0.0],
    ])


def _to_numpy_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        return x.cpu().contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _grid_info(mesh) -> tuple[int, int, bool] | None:
    """(H, W, has_cap) when ``mesh.faces`` is the cached DW-Mesh grid topology, else None."""
    settings = getattr(mesh, "settings", None) or {}
    size = settings.get("grid_size")
    if not size:
        return None
    from ex4d.mesh.dwmesh import grid_faces

    cap = getattr(mesh, "cap", "none")
    if mesh.faces is not grid_faces(size[0], size[1], cap, mesh.faces.device):
        return None
    return int(size[0]), int(size[1]), cap != "none"


class MeshRenderer:
    """Render DW-Meshes at a fixed (H, W) into float RGBA images.

    renderer = MeshRenderer(H, W); rgba = renderer.render(mesh, cam_from_world, K)  # (H, W, 4)

    antialias: True / "analytic" (default, silhouette blend as the reference's nvdiffrast
    antialias), "msaa" (4x MSAA) or False / "none"; see the module docstring.
    pixel_convention: "centers" (default) or "reference" (integer coordinates on pixel corners).

    Not thread-safe (one EGL context). Call :meth:`release` or use it as a context manager: GL
    objects are not freed by garbage collection.
    """

    def __init__(self, height: int, width: int, *, antialias: bool | str = True, pixel_convention: str = "centers"):
        if int(height) < 1 or int(width) < 1:
            raise InputError(f"render size must be positive, got {height}x{width}")
        self.pixel_convention = check_pixel_convention(pixel_convention)
        self.height, self.width = int(height), int(width)
        mode = {True: "analytic", False: "none"}.get(antialias, antialias)
        if mode not in ANTIALIAS_MODES:
            raise InputError(f"unknown antialias mode {antialias!r}; use True/False or one of {ANTIALIAS_MODES}")
        self.antialias = mode
        try:
            import moderngl
        except ImportError as exc:  # pragma: no cover - moderngl is a core dependency
            raise UserError(f"moderngl is not installed ({exc}); run `pip install moderngl`") from None
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as exc:
            raise UserError(
                f"cannot create a headless OpenGL (EGL) context: {exc}. Install the EGL loader and a GL "
                "driver (Debian/Ubuntu: `apt-get install libegl1 libgl1-mesa-dri`; on NVIDIA machines the "
                "driver's EGL vendor file must be visible, e.g. __EGL_VENDOR_LIBRARY_FILENAMES=.../10_nvidia.json)"
            ) from None
        ctx = self.ctx
        self.gl_renderer = ctx.info.get("GL_RENDERER", "unknown")
        logger.info("OpenGL renderer: %s (GL %s)", self.gl_renderer, ctx.version_code)
        self.samples = min(MSAA_SAMPLES, ctx.max_samples) if mode == "msaa" else 0
        # Several renderers may live in one process: always make this context current first.
        with ctx:
            size = (self.width, self.height)
            self._color_ms = ctx.renderbuffer(size, components=4, samples=self.samples, dtype="f4")
            self._depth_ms = ctx.depth_renderbuffer(size, samples=self.samples)
            attachments = [self._color_ms]
            self._face_buffer = None
            if mode == "analytic":
                self._face_buffer = ctx.renderbuffer(size, components=2, dtype="f4")
                attachments.append(self._face_buffer)
            self._fbo = ctx.framebuffer(color_attachments=attachments, depth_attachment=self._depth_ms)
            if self.samples:
                self._color_resolved = ctx.renderbuffer(size, components=4, dtype="f4")
                self._fbo_resolved = ctx.framebuffer(color_attachments=[self._color_resolved])
            else:
                self._fbo_resolved = self._fbo
            self._program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self._vbo = self._ibo = self._vao = None
        self._num_vertices = -1
        self._faces_ref = None  # the face tensor whose contents sit in the index buffer
        self._num_indices = 0
        self._adjacency = None  # face adjacency of _faces_ref (analytic antialiasing, generic meshes)
        self._faces_host = None  # (F, 3) uint32 copy of _faces_ref
        self._staging_key = None  # (V, device type) of the reused host staging buffers
        self._staging = self._staging_screen = None
        self._face_info = None  # (H, W, 2) float32 read-back buffer of (face id + 1, depth)
        # One SparseAntialiaser per thread that blends: it keeps a lookup table between frames, and
        # render_deferred's finishers may run on several threads at once.
        self._sparse_aa = threading.local()
        #: Set to a dict to receive the last frame's stage times (ms): stage (pack + device-to-host),
        #: gl (upload + draw + read back) = upload + draw_read, antialias. None (default): no timing.
        self.timings: dict | None = None

    @property
    def antialias_method(self) -> str:
        """"analytic-silhouette", "msaa4" or "none"."""
        if self.antialias == "analytic":
            return "analytic-silhouette"
        return f"msaa{self.samples}" if self.samples else "none"

    def __enter__(self) -> MeshRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Free every GL object and the context."""
        ctx = getattr(self, "ctx", None)
        if ctx is None:
            return
        self.ctx = None
        with ctx:  # objects must be freed in their own context, which may not be the current one
            objects = [self._vao, self._ibo, self._vbo, self._program, self._fbo,
                       self._color_ms, self._depth_ms]
            if self.samples:
                objects += [self._fbo_resolved, self._color_resolved]
            if self._face_buffer is not None:
                objects.append(self._face_buffer)
            for obj in objects:
                if obj is not None:
                    obj.release()
        ctx.release()

    def face_buffer(self) -> np.ndarray | None:
        """(H, W, 2) float32 copy of the last analytic-mode frame's (face index + 1, camera depth)
        per pixel (0 = background), or None if there is none (e.g. other antialias modes)."""
        return None if self._face_info is None else self._face_info.copy()

    # -- buffers -----------------------------------------------------------------------------
    def _stage(self, vertices, colors) -> np.ndarray:
        """Pack vertices + colours into one interleaved host array (V, 7) float32 in one pass.

        A reused host buffer (page-locked when the mesh lives on a GPU) avoids a fresh allocation
        and a second copy per frame; a CUDA mesh costs one asynchronous device-to-host copy and
        one synchronisation. Returns a numpy view of the buffer.
        """
        num_vertices = int(vertices.shape[0])
        if not isinstance(vertices, torch.Tensor) or not isinstance(colors, torch.Tensor):
            vertices = torch.from_numpy(_to_numpy_f32(vertices))
            colors = torch.from_numpy(_to_numpy_f32(colors))
        vertices = vertices.detach()
        colors = colors.detach().to(vertices.device)
        device = vertices.device
        key = (num_vertices, device.type)
        if self._staging_key != key:
            self._staging = torch.empty((num_vertices, 7), dtype=torch.float32, pin_memory=device.type == "cuda")
            self._staging_key = key
        if device.type == "cpu":
            torch.cat([vertices.float(), colors.float()], dim=1, out=self._staging)
        else:
            self._staging.copy_(torch.cat([vertices.float(), colors.float()], dim=1), non_blocking=True)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        return self._staging.numpy()

    def _upload(self, packed: np.ndarray, faces) -> None:
        """Vertex data into one interleaved buffer (re-allocated only when V changes); the index
        buffer only when a different face tensor arrives."""
        ctx = self.ctx
        num_vertices = int(packed.shape[0])
        rebuild_vao = False
        if num_vertices != self._num_vertices:
            if self._vbo is not None:
                self._vbo.release()
            self._vbo = ctx.buffer(packed, dynamic=True)
            self._num_vertices = num_vertices
            rebuild_vao = True
        else:
            self._vbo.write(packed)
        # Faces come from a per-size cache in ex4d.mesh, so the same tensor object recurs every
        # frame; re-upload only when a different tensor arrives (e.g. a torn mesh).
        if faces is not self._faces_ref:
            idx = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
            idx = np.ascontiguousarray(idx, dtype=np.uint32)
            if idx.size == 0:  # e.g. a torn mesh with every face deleted: nothing to draw
                pass
            elif self._ibo is not None and self._ibo.size == idx.nbytes:
                self._ibo.write(idx)
            else:
                if self._ibo is not None:
                    self._ibo.release()
                self._ibo = ctx.buffer(idx)
                rebuild_vao = True
            self._faces_ref = faces
            self._num_indices = int(idx.size)
            self._adjacency = None
            self._faces_host = idx.reshape(-1, 3)
        if rebuild_vao or self._vao is None:
            if self._vao is not None:
                self._vao.release()
            self._vao = ctx.vertex_array(self._program, [(self._vbo, "3f 4f", "in_position", "in_color")],
                                         index_buffer=self._ibo, index_element_size=4)

    # -- drawing -----------------------------------------------------------------------------
    def render(self, mesh, cam_from_world: np.ndarray, K: np.ndarray, near: float = REFERENCE_NEAR,
               far: float = REFERENCE_FAR) -> np.ndarray:
        """Rasterise ``mesh`` (a DWMesh or anything with vertices/colors/faces) from one camera.

        cam_from_world: (4, 4) OpenCV world -> camera. K: (3, 3) target intrinsics.
        The index buffer is re-uploaded only when a different ``faces`` object arrives: do not
        modify a face array in place between calls.
        Returns (H, W, 4) float32 RGBA in [0, 1]; row 0 is the top image row; empty pixels are 0.
        """
        finish = self.render_deferred(mesh, cam_from_world, K, near, far)
        start = _now()
        out = finish()
        if self.timings is not None:
            self.timings["antialias_ms"] += 1000 * (_now() - start)  # the blend, done in line here
        return out

    def render_deferred(self, mesh, cam_from_world: np.ndarray, K: np.ndarray, near: float = REFERENCE_NEAR,
                        far: float = REFERENCE_FAR) -> Callable[[], np.ndarray]:
        """:meth:`render` in two parts: everything that needs the GL context now, the CPU part later.

        Draws and reads back now (on the calling thread, which owns the context) and returns a
        function that finishes the frame: the analytic antialiasing's blend, on the CPU, which needs
        neither the context nor the mesh. It may run on another thread while this one renders the next
        frame, and several may run at once on different threads (each thread blends with its own
        antialiaser); call each once. ``render`` is ``render_deferred(...)()``: the same result. ``timings``
        (if set) then cover the render-time part only: the blend's time is the finisher's own.
        """
        if self.ctx is None:
            raise RuntimeError("MeshRenderer was released")
        cam_from_world = np.asarray(cam_from_world, dtype=np.float64)
        K = np.asarray(K, dtype=np.float64)
        if cam_from_world.shape != (4, 4) or K.shape != (3, 3):
            raise InputError(f"render needs cam_from_world (4,4) and K (3,3), got {cam_from_world.shape} "
                             f"and {K.shape}")
        if not (0 < near < far):
            raise InputError(f"need 0 < near < far, got near={near}, far={far}")
        vertices, colors, faces = mesh.vertices, mesh.colors, mesh.faces
        if vertices.shape[0] != colors.shape[0] or colors.shape[-1] != 4 or faces.shape[-1] != 3:
            raise InputError(f"mesh must have vertices (V,3), colors (V,4), faces (F,3); got "
                             f"{tuple(vertices.shape)}, {tuple(colors.shape)}, {tuple(faces.shape)}")
        with self.ctx:
            return self._draw(vertices, colors, faces, cam_from_world, K, near, far, _grid_info(mesh))

    def _draw(self, vertices, colors, faces, cam_from_world, K, near, far, grid) -> Callable[[], np.ndarray]:
        ctx = self.ctx
        clip_from_world = clip_from_camera(K, self.height, self.width, near, far,
                                           self.pixel_convention) @ cam_from_world
        analytic = self.antialias == "analytic" and faces.shape[0] > 0
        timer = self.timings
        t0 = _now() if timer is not None else 0.0
        packed = self._stage(vertices, colors)
        t1 = _now() if timer is not None else 0.0
        self._upload(packed, faces)
        t_up = _now() if timer is not None else 0.0
        # GLSL matrices are column-major.
        self._program["clip_from_world"].write(clip_from_world.T.astype(np.float32).tobytes())

        self._fbo.use()
        ctx.viewport = (0, 0, self.width, self.height)
        ctx.disable(ctx.CULL_FACE | ctx.BLEND)
        ctx.enable(ctx.DEPTH_TEST)
        self._fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        if self._num_indices:
            self._vao.render(mode=ctx.TRIANGLES, vertices=self._num_indices)
        if self.samples:
            ctx.copy_framebuffer(self._fbo_resolved, self._fbo)
        # The draw is queued, not finished: with a CUDA mesh, classify silhouette faces now so that
        # this GPU work overlaps the rasterisation instead of following the read-back. (With a CPU
        # mesh it would compete with llvmpipe's threads for the same cores: done after.)
        want_sil = analytic and self._num_indices and self._num_indices // 3 < _MAX_ANALYTIC_FACES
        on_cuda = isinstance(vertices, torch.Tensor) and vertices.is_cuda
        sil = None
        t_sil = 0.0
        if want_sil and on_cuda:
            ts = _now() if timer is not None else 0.0
            sil = self._silhouettes(vertices, clip_from_world, grid)
            t_sil = _now() - ts if timer is not None else 0.0
        out = np.empty((self.height, self.width, 4), dtype=np.float32)
        self._fbo_resolved.read_into(out, components=4, dtype="f4", alignment=1)  # no extra copy
        t2 = _now() if timer is not None else 0.0
        if want_sil and not on_cuda:
            sil = self._silhouettes(vertices, clip_from_world, grid)
        blend = self._antialias_blend(sil) if analytic and self._num_indices else None
        if timer is not None:
            t3 = _now()
            # Silhouette classification is booked under antialiasing although it runs mid-draw.
            timer.update(stage_ms=1000 * (t1 - t0), gl_ms=1000 * (t2 - t1 - t_sil),
                         antialias_ms=1000 * (t3 - t2 + t_sil), upload_ms=1000 * (t_up - t1),
                         draw_read_ms=1000 * (t2 - t_up - t_sil))

        def finish() -> np.ndarray:
            if blend is not None:
                blend(out)
            return out
        return finish

    def _silhouettes(self, vertices, clip_from_world: np.ndarray, grid):
        """The view's silhouette faces (:class:`~ex4d.render.antialias.SilhouetteSet`), computed
        on the mesh's device."""
        from ex4d.render.antialias import face_adjacency, silhouette_set

        if isinstance(vertices, torch.Tensor):
            vertices_t, device = vertices.detach(), vertices.device
        else:
            vertices_t, device = torch.from_numpy(_to_numpy_f32(vertices)), torch.device("cpu")
        faces_t = self._faces_ref if isinstance(self._faces_ref, torch.Tensor) else torch.from_numpy(
            self._faces_host.astype(np.int64))
        faces_t = faces_t.to(device)
        if grid is None and (self._adjacency is None or self._adjacency.device != device):
            self._adjacency = face_adjacency(faces_t)  # once per topology (and device)
        return silhouette_set(vertices_t, faces_t, clip_from_world, self.height, self.width, grid=grid,
                              adjacency=self._adjacency)

    def _antialias_blend(self, sil) -> Callable[[np.ndarray], None] | None:
        """Read back the frame's (face id + 1, depth) now; return the CPU blend of an RGBA frame, in
        place (None when there are too many faces to antialias). The buffer is new for every frame,
        so a blend still running on another thread never sees the next frame's read-back."""
        from ex4d.render.antialias import SparseAntialiaser

        num_faces = self._num_indices // 3
        if sil is None:
            logger.warning("%d faces: too many for analytic antialiasing, rendering without it", num_faces)
            return None
        face_info = np.empty((self.height, self.width, 2), dtype=np.float32)
        self._fbo.read_into(face_info, components=2, attachment=1, dtype="f4", alignment=1)
        self._face_info = face_info
        per_thread = self._sparse_aa

        def blend(rgba: np.ndarray) -> None:
            antialiaser = getattr(per_thread, "antialiaser", None)
            if antialiaser is None:  # the first blend on this thread
                antialiaser = per_thread.antialiaser = SparseAntialiaser()
            antialiaser(rgba, face_info[..., 0], face_info[..., 1], sil, num_faces)
        return blend


_now = time.perf_counter
