"""Round trips and hand-computed cases for ex4d.conventions."""

import numpy as np
import pytest

from ex4d import conventions as cv


def random_rigid(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    rotation = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = rng.normal(size=3)
    return transform


def test_reference_intrinsics_values():
    K = cv.reference_intrinsics(576, 1024)
    assert K.tolist() == [[500.0, 0.0, 512.0], [0.0, 500.0, 288.0], [0.0, 0.0, 1.0]]


def test_invert_rigid_round_trip():
    rng = np.random.default_rng(0)
    transforms = np.stack([random_rigid(rng) for _ in range(5)])
    inverse = cv.invert_rigid(transforms)
    np.testing.assert_allclose(inverse @ transforms, np.broadcast_to(np.eye(4), (5, 4, 4)), atol=1e-12)
    np.testing.assert_allclose(cv.invert_rigid(inverse), transforms, atol=1e-12)


def test_opengl_flip_is_an_involution_and_matches_reference_identity():
    rng = np.random.default_rng(1)
    transform = random_rigid(rng)
    back = cv.opengl_to_opencv_extrinsics(cv.opencv_to_opengl_extrinsics(transform))
    np.testing.assert_allclose(back, transform, atol=1e-12)
    # The reference's frame-0 extrinsics for the identity OpenCV pose are diag(1,-1,-1,1).
    np.testing.assert_array_equal(cv.opencv_to_opengl_extrinsics(np.eye(4)), np.diag([1.0, -1, -1, 1]))


def test_pixel_rays_project_back_to_integer_pixels():
    K = cv.reference_intrinsics(6, 8)
    rays = cv.pixel_rays(6, 8, K)
    assert rays.shape == (6, 8, 3)
    # Pixel (u=0, v=0) with f=500, c=(4, 3): ray (-4/500, -3/500, 1).
    np.testing.assert_allclose(rays[0, 0], [-4 / 500, -3 / 500, 1.0])
    points = 2.5 * rays
    uv = cv.project_points(points, K)
    u, v = np.meshgrid(np.arange(8), np.arange(6))
    np.testing.assert_allclose(uv, np.stack([u, v], -1), atol=1e-9)


def test_intrinsics_per_frame_checks_shape():
    K = cv.reference_intrinsics(4, 4)
    assert cv.as_intrinsics_per_frame(K, 3).shape == (3, 3, 3)
    with pytest.raises(ValueError):
        cv.as_intrinsics_per_frame(np.stack([K, K]), 3)
