"""ex4d.camera: target camera paths (reference presets, zooms, orbits, dolly zoom, pose files).

Everything is OpenCV ``cam_from_world`` (T, 4, 4) with world = the source camera of frame 0.
"""

from ex4d.camera.poses import look_at, reference_gl_from_world, view_angles
from ex4d.camera.trajectory import PRESET_NAMES, TRAJECTORY_FORMS, make_trajectory, parse_spec

__all__ = ["PRESET_NAMES", "TRAJECTORY_FORMS", "look_at", "make_trajectory", "parse_spec",
           "reference_gl_from_world", "view_angles"]
