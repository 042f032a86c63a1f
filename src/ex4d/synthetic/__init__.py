"""Procedural scenes with analytic ground truth (planes, boxes, spheres ray-cast in numpy).

The independent oracle for depth -> DW-Mesh -> render: exact source clips and depth, exact novel
views and exact visibility. See :mod:`ex4d.synthetic.scenes`.
"""

from ex4d.synthetic.primitives import Box, Plane, Primitive, Sphere, Texture
from ex4d.synthetic.scenes import (
    SCENES,
    GroundTruth,
    Scene,
    get_scene,
    make_example,
    observability,
    render_ground_truth,
    render_view,
    visible_from_source,
)

__all__ = [
    "SCENES", "Box", "GroundTruth", "Plane", "Primitive", "Scene", "Sphere", "Texture", "get_scene",
    "make_example", "observability", "render_ground_truth", "render_view", "visible_from_source",
]
