"""Analytic scene primitives (planes, axis-aligned boxes, spheres) and procedural solid textures.

Every primitive is ray-cast in closed form with numpy, vectorised over N rays. Rays are given as
an origin ``o`` (N, 3) and an *unnormalised* direction ``d`` (N, 3) whose component along the
viewing camera's optical axis is 1, so the ray parameter ``t`` of a hit is directly the z-depth of
that hit in the viewing camera (see :func:`ex4d.conventions.pixel_rays`).

Coordinates are the OpenCV frame of the source camera (x right, y down, z forward). Moving
primitives carry a ``motion`` callable ``frame_index -> (3,)`` translation; intersection is done in
the primitive's local frame (ray origin minus the translation), and the texture is evaluated at
the local point, so a texture moves with its object and colours stay a function of the surface
point only (no view-dependent shading): any correct novel view has exactly the same colours as
the source view for the surfaces both see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

#: Rays hitting closer than this (in units of the ray parameter) are ignored.
NEAR = 1e-6

#: Light direction (towards the light) for the Lambert term: from above (-y), left and front.
LIGHT = np.array([-0.4, -1.0, -0.6]) / np.linalg.norm([-0.4, -1.0, -0.6])

#: Shading = albedo * (AMBIENT + DIFFUSE * max(n . LIGHT, 0)).
AMBIENT, DIFFUSE = 0.55, 0.45

# An irrational-looking offset so that checker cell boundaries never coincide with a plane that
# sits at a round coordinate (z = 12 with period 0.5 would flicker between two cells).
_PATTERN_OFFSET = np.array([0.1234, 0.2718, 0.3771])


def _static(frame_index: int) -> np.ndarray:
    return np.zeros(3)


@dataclass(frozen=True)
class Texture:
    """A procedural solid texture: albedo (N, 3) in [0, 1] as a function of local points (N, 3).

    kind: ``"checker"`` (3-D checker of cell size ``period``), ``"stripes"`` (bands of width
    ``period`` across ``direction``) or ``"flat"``. The two-colour pattern is multiplied by a slow
    cosine gradient (wavelength ``gradient`` metres) so that no two places look alike, which makes
    PSNR sensitive to misplaced content.
    """

    kind: str = "checker"
    period: float = 0.25
    color_a: tuple[float, float, float] = (0.9, 0.9, 0.9)
    color_b: tuple[float, float, float] = (0.2, 0.2, 0.2)
    direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    gradient: float = 3.0

    def __call__(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64) + _PATTERN_OFFSET
        if self.kind == "checker":
            pattern = np.floor(p / self.period).sum(axis=-1) % 2
        elif self.kind == "stripes":
            direction = np.asarray(self.direction, dtype=np.float64)
            pattern = np.floor(p @ (direction / np.linalg.norm(direction)) / self.period) % 2
        elif self.kind == "flat":
            pattern = np.zeros(p.shape[:-1])
        else:
            raise ValueError(f"unknown texture kind {self.kind!r}; use checker, stripes or flat")
        a, b = np.asarray(self.color_a), np.asarray(self.color_b)
        albedo = a + (b - a) * pattern[..., None]
        phase = 2 * np.pi / self.gradient
        ramp = 0.8 + 0.2 * np.cos(phase * p[..., 0]) * np.cos(0.7 * phase * p[..., 1] + 0.5 * phase * p[..., 2])
        return np.clip(albedo * ramp[..., None], 0.0, 1.0)


@dataclass
class Primitive:
    """Base class: a textured surface, optionally translated per frame."""

    texture: Texture = field(default_factory=Texture)
    motion: Callable[[int], np.ndarray] = _static
    name: str = ""

    def offset(self, frame_index: int) -> np.ndarray:
        """Translation (3,) of the primitive at ``frame_index``."""
        return np.asarray(self.motion(frame_index), dtype=np.float64).reshape(3)

    def intersect(self, origin: np.ndarray, direction: np.ndarray, frame_index: int = 0) -> np.ndarray:
        """Ray parameter t (N,) of the first hit in front of the origin; +inf where missed.

        origin: (3,) or (N, 3). direction: (N, 3).
        """
        return self._intersect_local(origin - self.offset(frame_index), direction)

    def surface(self, points: np.ndarray, frame_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(albedo (N, 3), outward normal (N, 3)) at world points (N, 3) on the surface."""
        local = np.asarray(points, dtype=np.float64) - self.offset(frame_index)
        return self.texture(local), self._normal_local(local)

    def _intersect_local(self, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _normal_local(self, local: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Plane(Primitive):
    """An axis-aligned plane ``x[axis] = position``, optionally a bounded rectangle.

    axis: 0, 1 or 2. bounds: ((lo, hi), (lo, hi)) on the other two axes in increasing axis order
    (use +-inf for an unbounded side). normal_sign: which way the outward (lit) normal points
    along ``axis``; the plane is two-sided for ray hits either way.
    """

    axis: int = 2
    position: float = 10.0
    bounds: tuple[tuple[float, float], tuple[float, float]] = ((-np.inf, np.inf), (-np.inf, np.inf))
    normal_sign: float = -1.0

    def _intersect_local(self, origin, direction):
        origin = np.broadcast_to(origin, direction.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.position - origin[:, self.axis]) / direction[:, self.axis]
        t = np.where(np.isfinite(t) & (t > NEAR), t, np.inf)
        others = [a for a in range(3) if a != self.axis]
        for axis, (lo, hi) in zip(others, self.bounds):
            with np.errstate(invalid="ignore"):
                coord = origin[:, axis] + t * direction[:, axis]
            inside = (coord >= lo) & (coord <= hi)
            t = np.where(inside, t, np.inf)
        return t

    def _normal_local(self, local):
        normal = np.zeros_like(local)
        normal[:, self.axis] = self.normal_sign
        return normal


@dataclass
class Box(Primitive):
    """An axis-aligned box between corners ``lo`` and ``hi`` (3,), in its frame-0 position."""

    lo: tuple[float, float, float] = (-0.5, -0.5, 3.0)
    hi: tuple[float, float, float] = (0.5, 0.5, 4.0)

    def _intersect_local(self, origin, direction):
        origin = np.broadcast_to(origin, direction.shape)
        t_near = np.full(len(direction), -np.inf)
        t_far = np.full(len(direction), np.inf)
        for axis in range(3):
            o, d = origin[:, axis], direction[:, axis]
            with np.errstate(divide="ignore", invalid="ignore"):
                t1 = (self.lo[axis] - o) / d
                t2 = (self.hi[axis] - o) / d
            # A ray parallel to the slab (d = 0) is inside it for all t or for none; set that
            # explicitly rather than rely on +-inf / nan from the division.
            parallel = d == 0
            if parallel.any():
                inside = (o >= self.lo[axis]) & (o <= self.hi[axis])
                t1 = np.where(parallel, np.where(inside, -np.inf, np.inf), t1)
                t2 = np.where(parallel, np.inf, t2)
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
        hit = t_far >= np.maximum(t_near, NEAR)
        # From inside the box (t_near behind the origin) the first hit is the exit face.
        t = np.where(t_near > NEAR, t_near, t_far)
        return np.where(hit, t, np.inf)

    def _normal_local(self, local):
        lo, hi = np.asarray(self.lo, dtype=np.float64), np.asarray(self.hi, dtype=np.float64)
        distances = np.concatenate([np.abs(local - lo), np.abs(local - hi)], axis=1)  # (N, 6)
        face = distances.argmin(axis=1)
        normal = np.zeros_like(local)
        normal[np.arange(len(local)), face % 3] = np.where(face < 3, -1.0, 1.0)
        return normal


@dataclass
class Sphere(Primitive):
    """A sphere of ``radius`` around ``center`` (3,), in its frame-0 position."""

    center: tuple[float, float, float] = (0.0, 0.0, 4.0)
    radius: float = 0.5

    def _intersect_local(self, origin, direction):
        oc = np.broadcast_to(origin - np.asarray(self.center, dtype=np.float64), direction.shape)
        a = np.einsum("ij,ij->i", direction, direction)
        half_b = np.einsum("ij,ij->i", direction, oc)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        disc = half_b**2 - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = (-half_b - root) / a, (-half_b + root) / a
        t = np.where(t0 > NEAR, t0, np.where(t1 > NEAR, t1, np.inf))
        return np.where(disc >= 0, t, np.inf)

    def _normal_local(self, local):
        return (local - np.asarray(self.center, dtype=np.float64)) / self.radius


def shade(albedo: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """View-independent Lambert shading (N, 3) of albedo (N, 3) with outward normals (N, 3)."""
    lambert = np.clip(normal @ LIGHT, 0.0, None)
    return np.clip(albedo * (AMBIENT + DIFFUSE * lambert)[:, None], 0.0, 1.0)
