"""Benchmark the app's 3D view: time from opening the page to the first paint of a 512x512 scene.

Scene: frame 0 of the synthetic ``boxes`` example at 512x512 (exact depth), sent to a fresh
:class:`ex4d.app.scene3d.SceneView` as the app sends it (``ex4d.app.backend.frame0_points`` /
``frame0_mesh``): either its point cloud on the app's grid, or its DW-Mesh without the flagged faces,
with vertex colours. Not timed: making the scene. Timed per run, in a fresh page of one headless chromium (software WebGL, as on a machine
without a GPU):

* ``set_scene_s``: the server side, ``set_scene`` (subsampling, encoding) in Python;
* ``connect_s``: page open -> viser's client connected (its connect callback);
* ``first_paint_s``: page open -> the first screenshot in which scene pixels cover at least
  ``PAINTED`` of a probe rectangle in the middle of the view (polled; a screenshot takes about
  ``screenshot_s``, which bounds the resolution).

Median of 3 runs after a warm-up; one JSON object on stdout. Usage:
``python3 bench/bench_app_view.py [--scene points|mesh|both]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import git_commit  # noqa: E402

#: Fraction of the probe rectangle that scene pixels must cover for the scene to count as painted.
PAINTED = 0.25
#: The probe: the middle of an 800x600 page (about an iframe's size), clear of viser's panel (top right) and notices (top left).
PROBE = {"x": 150, "y": 150, "width": 400, "height": 400}
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"]


def make_scene(size: int = 512):
    """Frame 0 of the ``boxes`` example as the app sends it: points (N,3) and colours (N,3) uint8 on the
    app's grid, and the DW-Mesh without its flagged faces: (V,3), (F,3), (V,3) uint8."""
    from ex4d.app.backend import frame0_mesh, frame0_points
    from ex4d.synthetic.scenes import make_example

    clip, depth = make_example("boxes", num_frames=1, size=(size, size))
    points, colors = frame0_points(clip, depth.depth[0], depth.K)
    return points, colors, frame0_mesh(clip, depth.depth[0], depth.K)


def covered(png: bytes) -> float:
    """Fraction of a screenshot's pixels that are not viser's white background."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return float(np.mean(image.min(axis=2) < 235))


def one_run(browser, points, colors, mesh) -> dict:
    from playwright.sync_api import Error as PlaywrightError

    from ex4d.app.scene3d import SceneView

    view = SceneView()
    try:
        start = time.perf_counter()
        view.set_scene(points, colors, mesh=mesh)
        set_scene_s = time.perf_counter() - start
        page = browser.new_page(viewport={"width": 800, "height": 600})
        shots, connected, failed_shots = [], [], 0
        view.server.on_client_connect(lambda client: connected.append(time.perf_counter()))
        try:
            opened = time.perf_counter()
            page.goto(view.url, wait_until="commit", timeout=300_000)
            paint_s = None
            while time.perf_counter() - opened < 600:
                shot_start = time.perf_counter()
                try:
                    coverage = covered(page.screenshot(clip=PROBE, timeout=300_000))
                except PlaywrightError:  # chromium under heavy load sometimes fails a capture: try again
                    failed_shots += 1
                    continue
                shots.append(time.perf_counter() - shot_start)
                if coverage >= PAINTED:
                    paint_s = time.perf_counter() - opened
                    break
            if paint_s is None:
                raise RuntimeError(f"the scene never covered {PAINTED:.0%} of the probe (last {coverage:.1%})")
            connect_s = connected[0] - opened
        finally:
            page.close()
        return {"set_scene_s": set_scene_s, "connect_s": connect_s, "first_paint_s": paint_s,
                "screenshot_s": statistics.median(shots), "coverage": coverage, "failed_screenshots": failed_shots}
    finally:
        view.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", choices=("points", "mesh", "both"), default="both",
                        help="what the view shows (default: both, one after the other)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default: 3)")
    args = parser.parse_args()

    import numpy as np
    import viser
    from playwright.sync_api import sync_playwright

    from ex4d.app.scene3d import POINT_CAP

    points, colors, mesh = make_scene()
    kinds = ("points", "mesh") if args.scene == "both" else (args.scene,)
    results = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=os.environ.get("EX4D_CHROMIUM", "/usr/bin/chromium"),
                                             headless=True, args=CHROMIUM_ARGS)
        version = browser.version
        try:
            for kind in kinds:
                runs = [one_run(browser, points, colors, mesh if kind == "mesh" else None)
                        for _ in range(args.runs + 1)][1:]
                results[kind] = {
                    **{key: round(statistics.median(r[key] for r in runs), 3)
                       for key in ("set_scene_s", "connect_s", "first_paint_s", "screenshot_s")},
                    "first_paint_runs_s": [round(r["first_paint_s"], 3) for r in runs],
                    "coverage_at_paint": round(statistics.median(r["coverage"] for r in runs), 3),
                    "failed_screenshots": sum(r["failed_screenshots"] for r in runs),
                }
        finally:
            browser.close()
    print(json.dumps({
        "bench": "app_view_first_paint", "commit": git_commit(),
        "device": f"cpu: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
                  f"chromium {version} headless, software WebGL (SwiftShader)",
        "viser": viser.__version__, "numpy": np.__version__, "size": [512, 512],
        "points_sent": min(len(points), POINT_CAP), "mesh_vertices": len(mesh[0]), "mesh_faces": len(mesh[1]),
        "painted_threshold": PAINTED, "runs": args.runs, "results": results,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
