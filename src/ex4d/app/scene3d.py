"""The web app's 3D keyframe view: one viser server per app session, shown in the page as an iframe.

The view shows frame 0's scene (a point cloud, or the DW-Mesh when one is given), the source camera,
the target path as small frustums with a line through their centres, and the keyframes as larger
clickable frustums. The selected keyframe carries a transform gizmo; viser's own panel (inside the
iframe) adds, deletes and selects keyframes, moves the selected one by numbers, scrubs the timeline
and looks through the selected camera. Every edit calls the registered callbacks with the whole
keyframe list, so the app re-interpolates the path and calls :meth:`SceneView.set_cameras` back.

Conventions. ex4d's cameras are OpenCV (x right, y down, z forward), ``cam_from_world`` 4x4 (world ->
camera), K in pixels, world = frame 0's source camera. viser's camera frustums and its viewer camera
use the same OpenCV camera axes, but a scene node is placed by its *parent-from-local* rotation
(``wxyz``, a unit quaternion) and translation (``position``): for a camera that is ``world_from_cam``,
i.e. the rotation ``R^T`` and the camera centre ``-R^T t``. Those conversions live here and nowhere
else. The scene's up direction is -y (OpenCV's y points down), so orbiting the view keeps the scene
upright.

Threads. viser runs GUI and scene callbacks on its own threads; the app calls the public methods
from Gradio's. Shared state is guarded by one re-entrant lock, and the app's callbacks are called
outside it (a callback that calls :meth:`SceneView.set_cameras` back cannot deadlock).

Nothing is fetched from the network: viser serves its prebuilt client from the installed package.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
from typing import Callable

import numpy as np

from ex4d.camera.interpolate import matrix_to_quaternion, quaternion_to_matrix
from ex4d.conventions import invert_rigid

log = logging.getLogger(__name__)

#: At most this many points are sent to the browser (a 512x512 frame has 262,144): first paint stays
#: quick and the page light. The subsample is deterministic (same scene, same points).
POINT_CAP = 200_000

#: About this many small frustums mark the target path (every k-th frame, the last one always).
PATH_FRUSTUMS = 16

SOURCE_COLOR = (40, 110, 255)      # the source camera: blue
PATH_COLOR = (150, 150, 150)       # the target path: grey
CURRENT_COLOR = (255, 210, 0)      # the timeline's current frame: yellow
KEY_COLOR = (255, 120, 0)          # keyframes: orange
SELECTED_COLOR = (230, 20, 60)     # the selected keyframe: red

Keyframes = list  # list[tuple[int, np.ndarray]]: (frame_index, cam_from_world (4, 4) float64)


# --- conventions: OpenCV cameras <-> viser scene nodes (pure, tested by hand) ---------------------

def node_pose(cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV ``cam_from_world`` (4, 4) -> viser node pose ``(wxyz (4,), position (3,))``.

    viser places a node by its parent-from-local transform, so the pose is ``world_from_cam``: the
    rotation R^T as a (w, x, y, z) quaternion and the camera centre -R^T t.
    """
    world_from_cam = invert_rigid(np.asarray(cam_from_world, dtype=np.float64))
    return matrix_to_quaternion(world_from_cam[:3, :3]), world_from_cam[:3, 3].copy()


def cam_from_world_of_node(wxyz, position) -> np.ndarray:
    """viser node pose (quaternion (w, x, y, z), position (3,)) -> OpenCV ``cam_from_world`` (4, 4)."""
    world_from_cam = np.eye(4)
    world_from_cam[:3, :3] = quaternion_to_matrix(np.asarray(wxyz, dtype=np.float64))
    world_from_cam[:3, 3] = np.asarray(position, dtype=np.float64)
    return invert_rigid(world_from_cam)


def vertical_fov(K: np.ndarray, size: tuple[int, int]) -> float:
    """Vertical field of view in radians of a camera with K (3, 3) px and image size (H, W)."""
    return 2.0 * math.atan2(size[0] / 2.0, float(np.asarray(K)[1, 1]))


def viewer_camera(cam_from_world: np.ndarray, K: np.ndarray, size: tuple[int, int],
                  look_distance: float) -> dict:
    """Where viser's viewer camera goes to look through an OpenCV camera.

    viser's viewer is an orbit camera given by ``position``, ``look_at`` and ``up_direction`` (its
    image up, i.e. the camera's -y axis, in world coordinates); this keeps the camera's roll exactly.
    Returns ``{"position": (3,), "look_at": (3,), "up_direction": (3,), "fov": radians}``.
    """
    world_from_cam = invert_rigid(np.asarray(cam_from_world, dtype=np.float64))
    rotation, centre = world_from_cam[:3, :3], world_from_cam[:3, 3]
    return {
        "position": centre.copy(),
        "look_at": centre + rotation[:, 2] * float(look_distance),
        "up_direction": -rotation[:, 1],
        "fov": vertical_fov(K, size),
    }


def frustum_scale(depth: float, fov: float, aspect: float) -> float:
    """viser's ``scale`` that draws a camera frustum ``depth`` deep (from its apex to its image plane).

    viser normalises a frustum to unit volume: with y = tan(fov / 2), x = y * aspect and z = 1 it
    divides all three by cbrt(x * y * z / 3) before scaling, so a narrow camera would be drawn long.
    """
    half = math.tan(fov / 2.0)
    return float(depth) * (half * half * aspect / 3.0) ** (1.0 / 3.0)


def subsample(points: np.ndarray, colors: np.ndarray, cap: int = POINT_CAP) -> tuple[np.ndarray, np.ndarray]:
    """At most ``cap`` of the points (N, 3) and colours (N, 3), chosen with a fixed seed."""
    if len(points) <= cap:
        return points, colors
    keep = np.sort(np.random.default_rng(0).choice(len(points), size=cap, replace=False))
    return points[keep], colors[keep]


def path_indices(num_frames: int, count: int = PATH_FRUSTUMS) -> np.ndarray:
    """Frames that get a small path frustum: every k-th frame and always the last."""
    step = max(1, math.ceil(num_frames / count))
    return np.unique(np.append(np.arange(0, num_frames, step), num_frames - 1))


def _check_pose(cam_from_world, what: str) -> np.ndarray:
    pose = np.asarray(cam_from_world, dtype=np.float64)
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        raise ValueError(f"{what} must be a finite (4, 4) cam_from_world, got shape {pose.shape}")
    return pose


# --- the view --------------------------------------------------------------------------------------

class SceneView:
    """A viser server showing one session's scene, cameras and keyframes.

    ``url`` is what the page's iframe loads. The server binds ``host`` (127.0.0.1 by default, as the
    app) on ``port`` (None: a free port chosen by the OS).
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        import viser

        self._lock = threading.RLock()
        self._callbacks: list[Callable[[Keyframes], None]] = []
        self._keys: dict[int, np.ndarray] = {}
        self._key_nodes: dict = {}
        self._path_nodes: list = []
        self._selected: int | None = None
        self._frame = 0
        self._K = np.array([[500.0, 0, 256], [0, 500.0, 256], [0, 0, 1]])
        self._size = (512, 512)
        self._path = np.eye(4)[None]
        self._source = np.eye(4)
        self._scale = 1.0          # median scene distance: where the view looks, the point size
        self._near = 1.0           # near scene distance (10th percentile): the size of frustums and gizmo
        self._scene_node = None
        self._closed = False

        # viser prints a banner on start and a line on stop whatever ``verbose`` says; the library is
        # silent (the app prints its own address), so both go to a throw-away buffer.
        with contextlib.redirect_stdout(io.StringIO()):
            self.server = viser.ViserServer(host=host, port=0 if port is None else port, verbose=False)
        self.url = f"http://{host}:{self.server.get_port()}"
        self.server.scene.set_up_direction("-y")
        self.server.gui.configure_theme(control_width="small", show_logo=False, show_share_button=False)
        self._place_initial_camera()
        self._build_gui()
        self._gizmo = self.server.scene.add_transform_controls(
            "/gizmo", scale=0.25, visible=False, depth_test=False)
        self._gizmo.on_update(self._on_gizmo)
        self._current = self.server.scene.add_camera_frustum(
            "/timeline/current", fov=vertical_fov(self._K, self._size), aspect=1.0, scale=0.12,
            color=CURRENT_COLOR, thickness=3.0, thickness_units="screen")
        self._source_node = self.server.scene.add_camera_frustum(
            "/source", fov=vertical_fov(self._K, self._size), aspect=1.0, scale=0.15,
            color=SOURCE_COLOR, thickness=3.0, thickness_units="screen")

    # --- public interface (called from the app's threads) ---

    def set_scene(self, points, colors, *, mesh=None) -> None:
        """Show frame 0's scene.

        points (N, 3) float32 in world coordinates, colors (N, 3) uint8. ``mesh``, when given, is
        ``(vertices (V, 3), faces (F, 3), vertex colours (V, 3) uint8)`` and is shown instead of the
        points (the points still set the scale); pass only the faces to draw (a DW-Mesh's flagged
        faces, black, include the border ring pushed to z = 100). Points beyond :data:`POINT_CAP` are
        subsampled.
        """
        points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        if len(points) != len(colors):
            raise ValueError(f"points {points.shape} and colors {colors.shape} differ in length")
        finite = np.all(np.isfinite(points), axis=1)
        points, colors = subsample(points[finite], colors[finite])
        with self._lock:
            if len(points):
                distance = np.linalg.norm(points, axis=1)
                self._scale = max(float(np.median(distance)), 1e-3)
                self._near = max(float(np.percentile(distance, 10)), 1e-3)
            if self._scene_node is not None:
                self._scene_node.remove()
            if mesh is not None:
                self._scene_node = self._add_mesh(*mesh)
            else:
                # One pixel at the median depth spans about depth / f; a little more closes the gaps
                # left by subsampling and by surfaces seen at an angle.
                point_size = 2.5 * self._scale / float(self._K[0, 0])
                self._scene_node = self.server.scene.add_point_cloud(
                    "/scene/points", points, colors, point_size=point_size, point_shape="square",
                    precision="float32", point_shading="flat")
            self._place_initial_camera()
            self._redraw_cameras()

    def set_cameras(self, K, size, source_cam_from_world, path_cam_from_world, keyframes) -> None:
        """Show the source camera, the target path and the keyframes.

        K (3, 3) px, size (H, W), source (4, 4), path (T, 4, 4) cam_from_world, keyframes a list of
        ``(frame_index, cam_from_world (4, 4))``. Keyframes already shown are moved, not recreated,
        so the app can call this from its keyframe callback while the user is editing.
        """
        K = np.asarray(K, dtype=np.float64)
        path = np.asarray(path_cam_from_world, dtype=np.float64)
        if K.shape != (3, 3) or path.ndim != 3 or path.shape[1:] != (4, 4) or len(path) == 0:
            raise ValueError(f"K must be (3, 3) and the path (T, 4, 4); got {K.shape} and {path.shape}")
        keys = {int(f): _check_pose(p, f"keyframe {f}") for f, p in keyframes}
        with self._lock:
            self._K, self._size = K, (int(size[0]), int(size[1]))
            self._source = _check_pose(source_cam_from_world, "source_cam_from_world")
            self._path = path
            self._keys = keys
            if self._selected not in keys:
                self._selected = None
            self._frame = min(self._frame, len(path) - 1)
            self._place_initial_camera()
            self._redraw_cameras()

    def on_keyframes_edited(self, callback: Callable[[Keyframes], None]) -> None:
        """Register ``callback(list[(frame, cam_from_world)])``, called from viser's thread after
        every keyframe edit made in the 3D view (sorted by frame)."""
        with self._lock:
            self._callbacks.append(callback)

    def set_frame(self, frame_index: int) -> None:
        """Timeline scrub: highlight the path camera of ``frame_index`` (clipped to the path)."""
        with self._lock:
            self._frame = int(np.clip(frame_index, 0, len(self._path) - 1))
            self._show_frame()

    def look_through(self, cam_from_world, K, size) -> None:
        """Put every connected viewer's camera at ``cam_from_world`` with the field of view of K."""
        with self._lock:
            view = viewer_camera(_check_pose(cam_from_world, "cam_from_world"), K, size, self._scale)
        for client in self.server.get_clients().values():
            with client.atomic():
                client.camera.position = view["position"]
                client.camera.look_at = view["look_at"]
                client.camera.up_direction = view["up_direction"]
                client.camera.fov = view["fov"]

    def keyframes(self) -> Keyframes:
        """The keyframes as the view holds them now, sorted by frame."""
        with self._lock:
            return [(f, self._keys[f].copy()) for f in sorted(self._keys)]

    def close(self) -> None:
        """Stop the server (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()

    # --- edits: the handlers behind the gizmo and the panel (viser's threads) ---

    def add_keyframe(self, frame_index: int, cam_from_world=None) -> None:
        """Add (or replace) the keyframe at ``frame_index``; by default at the path's pose there."""
        with self._lock:
            frame = int(np.clip(frame_index, 0, len(self._path) - 1))
            pose = self._path[frame] if cam_from_world is None else cam_from_world
            self._keys[frame] = _check_pose(pose, "keyframe").copy()
            self._selected = frame
            self._redraw_cameras()
        self._notify()

    def move_keyframe(self, frame_index: int, cam_from_world) -> None:
        """Give the keyframe at ``frame_index`` a new pose."""
        with self._lock:
            if frame_index not in self._keys:
                return
            self._keys[frame_index] = _check_pose(cam_from_world, "keyframe").copy()
            self._redraw_keyframe(frame_index)
        self._notify()

    def delete_keyframe(self, frame_index: int | None = None) -> None:
        """Delete the keyframe at ``frame_index`` (default: the selected one)."""
        with self._lock:
            frame = self._selected if frame_index is None else frame_index
            if frame not in self._keys:
                return
            del self._keys[frame]
            if self._selected == frame:
                self._selected = None
            self._redraw_cameras()
        self._notify()

    def select_keyframe(self, frame_index: int | None) -> None:
        """Select a keyframe: it turns red and gets the gizmo; the timeline jumps to its frame."""
        with self._lock:
            self._selected = frame_index if frame_index in self._keys else None
            if self._selected is not None:
                self._frame = self._selected
            self._redraw_selection()
            self._show_frame()

    def _notify(self) -> None:
        keys = self.keyframes()
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(keys)
            except Exception:  # a failing app callback must not kill viser's worker thread
                log.exception("keyframe callback failed")

    def _on_gizmo(self, event) -> None:
        # The frustum follows the gizmo live; the app hears of the move once, when the drag ends.
        with self._lock:
            frame = self._selected
            if frame is None or frame not in self._keys:
                return
            pose = cam_from_world_of_node(self._gizmo.wxyz, self._gizmo.position)
            node = self._key_nodes.get(frame)
            if node is not None:
                node.wxyz, node.position = self._gizmo.wxyz, self._gizmo.position
            if event.phase != "end":
                return
        self.move_keyframe(frame, pose)

    # --- drawing (under the lock) ---

    def _add_mesh(self, vertices, faces, vertex_colors):
        import trimesh

        # Reverse the winding: ex4d's faces are counter-clockwise in the image (y down), which three.js
        # (y up) sees as back faces and culls.
        faces = np.asarray(faces)[:, ::-1]
        mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float32), faces,
                               vertex_colors=np.asarray(vertex_colors, dtype=np.uint8), process=False)
        return self.server.scene.add_mesh_trimesh("/scene/mesh", mesh)

    def _frustum(self, name: str, pose: np.ndarray, scale: float, color, thickness: float):
        wxyz, position = node_pose(pose)
        fov, aspect = vertical_fov(self._K, self._size), self._size[1] / self._size[0]
        return self.server.scene.add_camera_frustum(
            name, fov=fov, aspect=aspect, scale=frustum_scale(scale * self._near, fov, aspect), color=color, thickness=thickness, thickness_units="screen",
            wxyz=wxyz, position=position)

    def _redraw_cameras(self) -> None:
        scene = self.server.scene
        self._source_node.remove()
        self._source_node = self._frustum("/source", self._source, 0.15, SOURCE_COLOR, 3.0)
        for node in self._path_nodes:
            node.remove()
        self._path_nodes = [self._frustum(f"/path/{i}", self._path[i], 0.05, PATH_COLOR, 1.0)
                            for i in path_indices(len(self._path))]
        centres = invert_rigid(self._path)[:, :3, 3]
        if len(centres) > 1:
            segments = np.stack([centres[:-1], centres[1:]], axis=1)
            self._path_nodes.append(scene.add_line_segments(
                "/path/line", segments, PATH_COLOR, thickness=2.0, thickness_units="screen"))
        for frame in [f for f in self._key_nodes if f not in self._keys]:
            self._key_nodes.pop(frame).remove()
        for frame in self._keys:
            self._redraw_keyframe(frame)
        self._current.remove()
        self._current = self._frustum("/timeline/current", self._path[self._frame], 0.08, CURRENT_COLOR, 3.0)
        self._gizmo.scale = 0.15 * self._near
        self._update_gui()
        self._redraw_selection()

    def _redraw_keyframe(self, frame: int) -> None:
        node = self._key_nodes.get(frame)
        if node is None:
            node = self._frustum(f"/keyframes/{frame}", self._keys[frame], 0.1, KEY_COLOR, 3.0)
            node.on_click(lambda _event, frame=frame: self.select_keyframe(frame))
            self._key_nodes[frame] = node
        else:
            node.wxyz, node.position = node_pose(self._keys[frame])
            node.fov, node.aspect = vertical_fov(self._K, self._size), self._size[1] / self._size[0]
            node.scale = frustum_scale(0.1 * self._near, node.fov, node.aspect)

    def _redraw_selection(self) -> None:
        for frame, node in self._key_nodes.items():
            node.color = SELECTED_COLOR if frame == self._selected else KEY_COLOR
        if self._selected is None:
            self._gizmo.visible = False
            self._gui_position.disabled = True
            self._gui_key.value = "none"
            return
        wxyz, position = node_pose(self._keys[self._selected])
        self._gizmo.wxyz, self._gizmo.position = wxyz, position
        self._gizmo.visible = True
        self._gui_position.disabled = False
        self._gui_position.value = tuple(float(x) for x in position)
        self._gui_key.value = f"frame {self._selected}"

    def _show_frame(self) -> None:
        wxyz, position = node_pose(self._path[self._frame])
        self._current.wxyz, self._current.position = wxyz, position
        if self._gui_frame.value != self._frame:
            self._gui_frame.value = self._frame

    def _place_initial_camera(self) -> None:
        # Behind and above the source camera (above is -y), looking at the nearest surfaces, where the
        # paths go: the back wall of a scene can lie many times further and would shrink the cameras.
        camera = self.server.initial_camera
        camera.position = (0.0, -0.6 * self._near, -1.5 * self._near)
        camera.look_at = (0.0, 0.0, self._near)
        camera.up = (0.0, -1.0, 0.0)
        # Wider than the source camera (within 30-60 degrees): a narrow source still fills a good part
        # of the view, and the path beside it stays in sight.
        camera.fov = float(np.clip(1.5 * vertical_fov(self._K, self._size), np.radians(30.0), np.radians(60.0)))

    # --- the in-viewer panel ---

    def _build_gui(self) -> None:
        gui = self.server.gui
        self._gui_frame = gui.add_slider("Frame", min=0, max=1, step=1, initial_value=0)
        self._gui_key = gui.add_dropdown("Keyframe", options=("none",), initial_value="none")
        self._gui_add = gui.add_button("Add keyframe at frame", hint="Adds a keyframe at the slider's "
                                       "frame, on the path; drag its gizmo or type a position")
        self._gui_add_view = gui.add_button("Add keyframe from view", hint="Adds a keyframe at the "
                                            "slider's frame where this view's camera is")
        self._gui_delete = gui.add_button("Delete keyframe", hint="Deletes the selected keyframe")
        self._gui_look = gui.add_button("Look through keyframe", hint="Puts this view's camera at the "
                                        "selected keyframe (or the slider's frame)")
        self._gui_position = gui.add_vector3("Position", initial_value=(0.0, 0.0, 0.0), step=0.01,
                                             disabled=True, hint="The selected keyframe's camera centre")

        @self._gui_frame.on_update
        def _(event) -> None:
            with self._lock:
                self._frame = int(np.clip(self._gui_frame.value, 0, len(self._path) - 1))
                self._show_frame()

        @self._gui_key.on_update
        def _(event) -> None:
            value = self._gui_key.value
            frame = int(value.split()[-1]) if value.startswith("frame ") else None
            with self._lock:
                if frame != self._selected:
                    self.select_keyframe(frame)

        self._gui_add.on_click(lambda event: self.add_keyframe(self._frame))

        @self._gui_add_view.on_click
        def _(event) -> None:
            camera = event.client.camera
            self.add_keyframe(self._frame, cam_from_world_of_node(camera.wxyz, camera.position))

        self._gui_delete.on_click(lambda event: self.delete_keyframe())

        @self._gui_look.on_click
        def _(event) -> None:
            with self._lock:
                pose = self._keys[self._selected] if self._selected is not None else self._path[self._frame]
                K, size = self._K, self._size
            self.look_through(pose, K, size)

        @self._gui_position.on_update
        def _(event) -> None:
            if event.client is None:    # set by _redraw_selection, not typed by the user
                return
            with self._lock:
                frame = self._selected
                if frame is None:
                    return
                pose = self._keys[frame].copy()
                rotation = pose[:3, :3]
                pose[:3, 3] = -rotation @ np.asarray(self._gui_position.value, dtype=np.float64)
            self.move_keyframe(frame, pose)
            with self._lock:
                self._redraw_selection()

    def _update_gui(self) -> None:
        self._gui_frame.max = max(len(self._path) - 1, 1)
        self._gui_frame.disabled = len(self._path) < 2
        self._gui_key.options = ("none",) + tuple(f"frame {f}" for f in sorted(self._keys))
