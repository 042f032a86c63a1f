"""ex4d.render: rasterise DW-Meshes (moderngl/EGL) into the generator's condition (colour + mask)."""

from ex4d.render.condition import render_condition
from ex4d.render.rasterizer import ANTIALIAS_MODES, MeshRenderer, clip_from_camera

__all__ = ["ANTIALIAS_MODES", "MeshRenderer", "clip_from_camera", "render_condition"]
