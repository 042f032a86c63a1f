"""Per-frame DW-Mesh build + render time (the reconstruction stage's inner loop).

For each size (512x512 and 1024x576 by default) and each antialiasing setting, runs the same work
as ``ex4d.render.condition.render_condition`` does per frame -- build frame k's DW-Mesh on the
device (torch), render it from a moving camera with moderngl/EGL, threshold alpha > 125/255 and
multiply the colour by the mask -- on a synthetic depth video that changes every frame. Reports
the median of ``--frames`` frames after ``--warmup`` frames, split into build / render / post, and
render into stage (pack + device-to-host) / gl (upload + draw + read back) / antialias. With the
analytic mode, one frame is also checked against the plain statement of the algorithm
(``check_vs_plain``: masks equal, colour difference).

Prints ONE JSON object. Anchor: the reference's per-frame loop on one H100 (mesh build with faces
regenerated every frame + nvdiffrast rasterize/interpolate/antialias + threshold + host copy) takes
16.6-18.5 ms at 512x512 (performance-anchors.md section 5); ``ratio_to_anchor`` divides our median
by 16.6 ms. Targets: <= 150 ms/frame at 512x512 on a 2-core CPU, <= 10 ms/frame on the GPU.

    python bench/bench_recon.py [--device cpu|cuda|auto] [--frames 20] [--sizes 512x512,1024x576]
        [--antialias analytic,none] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ex4d.conventions import reference_intrinsics  # noqa: E402
from ex4d.mesh.dwmesh import build_dw_mesh  # noqa: E402
from ex4d.render.condition import finish_frame  # noqa: E402
from ex4d.render.rasterizer import MeshRenderer  # noqa: E402

ANCHOR_MS = 16.6  # reference, H100, 512x512, per frame (lower end of 16.6-18.5 ms)


def _git_commit() -> str:
    for name in ("EX4D_COMMIT", "EX4D_GIT_COMMIT"):  # the device machine's copy of the tree may lack .git
        if os.environ.get(name):
            return os.environ[name]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _scene(height: int, width: int, num: int, device: torch.device):
    """Depth (num, H, W) and colours (num, H, W, 3): a slanted, rippled background with a box in
    front that slides across the frame (so every frame has real discontinuities to flag)."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    base = 6.0 + 2.0 * v / height + 0.3 * torch.sin(u / 23.0)
    depths, colours = [], []
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(height, width, 3, generator=g)
    for k in range(num):
        d = base.clone()
        c0 = int(width * (0.2 + 0.5 * k / max(num - 1, 1)))
        d[height // 4: 3 * height // 4, c0: c0 + width // 4] = 3.0
        depths.append(d)
        colours.append(torch.roll(texture, shifts=k, dims=1))
    return torch.stack(depths).to(device), torch.stack(colours).to(device)


def _orbit_pose(k: int, num: int, radius: float = 3.15, max_deg: float = 30.0) -> np.ndarray:
    """cam_from_world for a yaw orbit about the pivot (0, 0, radius), OpenCV frames."""
    a = np.radians(max_deg) * k / max(num - 1, 1)
    eye = np.array([radius * np.sin(a), 0.0, radius * (1 - np.cos(a))])
    # Rows of cam_from_world's rotation are the camera axes in world coordinates; the camera
    # looks at the pivot: forward = (-sin a, 0, cos a).
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = -rot @ eye
    return pose


def _check_against_plain(mesh, pose, K, height, width) -> dict:
    """One frame through the renderer's analytic mode vs the plain statement of the algorithm
    (single-sample render + ``antialias_silhouettes`` on host copies): masks must be equal."""
    from ex4d.render.antialias import antialias_silhouettes, grid_silhouette_faces
    from ex4d.render.rasterizer import clip_from_camera

    with MeshRenderer(height, width, antialias="analytic") as fast, MeshRenderer(height, width,
                                                                                antialias="none") as plain:
        got = fast.render(mesh, pose, K)
        info = fast.face_buffer()
        base = plain.render(mesh, pose, K)
    clip = clip_from_camera(K, height, width) @ pose
    sil, xy = grid_silhouette_faces(mesh.vertices, (height, width), mesh.cap != "none", clip, height, width)
    want = antialias_silhouettes(base, info[..., 0].astype(np.int64) - 1, info[..., 1], xy.cpu().numpy(),
                                 mesh.faces.cpu().numpy(), sil.cpu().numpy())
    m_got, m_want = np.zeros((height, width), bool), np.zeros((height, width), bool)
    c_got, c_want = np.zeros((height, width, 3), np.float32), np.zeros((height, width, 3), np.float32)
    finish_frame(got, m_got, c_got)
    finish_frame(want, m_want, c_want)
    return {"mask_equal": bool(np.array_equal(m_got, m_want)),
            "max_abs_colour_diff": float(np.abs(c_got - c_want).max()),
            "pixels_blended": int((np.abs(want - base).max(-1) > 0).sum())}


def bench_size(height: int, width: int, device: torch.device, frames: int, warmup: int, antialias: str,
               check: bool = False) -> dict:
    total = frames + warmup
    depth, rgb = _scene(height, width, total, device)
    K = reference_intrinsics(height, width)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stages = {name: [] for name in ("build", "stage", "gl", "upload", "draw_read", "antialias", "post", "total",
                                    "cpu")}
    visible = []
    mask = np.zeros((height, width), dtype=bool)
    colour = np.zeros((height, width, 3), dtype=np.float32)
    with MeshRenderer(height, width, antialias=antialias) as renderer:
        renderer.timings = {}
        for k in range(total):
            sync()
            c0 = time.process_time()
            t0 = time.perf_counter()
            mesh = build_dw_mesh(depth[k], rgb[k], K)
            sync()
            t1 = time.perf_counter()
            rgba = renderer.render(mesh, _orbit_pose(k, total), K)
            t2 = time.perf_counter()
            finish_frame(rgba, mask, colour)  # exactly what render_condition does per frame
            t3 = time.perf_counter()
            c3 = time.process_time()
            if k >= warmup:
                stages["cpu"].append(c3 - c0)
                stages["build"].append(t1 - t0)
                stages["post"].append(t3 - t2)
                stages["total"].append(t3 - t0)
                for name in ("stage", "gl", "upload", "draw_read", "antialias"):
                    stages[name].append(renderer.timings.get(f"{name}_ms", 0.0) / 1000)
                visible.append(float(mask.mean()))
        gl_renderer, aa = renderer.gl_renderer, renderer.antialias_method
    del colour

    def ms(x):
        return round(1000 * statistics.median(x), 3)

    result = {"size": [height, width], "vertices": height * width, "faces": 2 * (height - 1) * (width - 1),
              "antialias": aa, "gl_renderer": gl_renderer, "frames_timed": frames, "warmup": warmup,
              "median_ms": ms(stages["total"]), "build_ms": ms(stages["build"]),
              "render_ms": ms([a + b + c for a, b, c in zip(stages["stage"], stages["gl"], stages["antialias"])]),
              # render = stage (pack vertices+colours, device->host) + gl (upload, draw, read back)
              # + antialias (silhouette faces on the device, blend on the host)
              "stage_ms": ms(stages["stage"]), "gl_ms": ms(stages["gl"]), "antialias_ms": ms(stages["antialias"]),
              # gl = upload (vertex buffer write) + draw_read (draw, then blocking read-back)
              "upload_ms": ms(stages["upload"]), "draw_read_ms": ms(stages["draw_read"]),
              "post_ms": ms(stages["post"]),
              "min_ms": round(1000 * min(stages["total"]), 3), "max_ms": round(1000 * max(stages["total"]), 3),
              # CPU time of this process (all its threads, llvmpipe's included): less sensitive than
              # wall time to other processes on a shared machine.
              "cpu_time_ms": ms(stages["cpu"]),
              "visible_fraction": round(statistics.mean(visible), 4),
              "ratio_to_anchor": round(statistics.median(stages["total"]) * 1000 / ANCHOR_MS, 3)}
    if check and antialias == "analytic":
        result["check_vs_plain"] = _check_against_plain(mesh, _orbit_pose(total - 1, total), K, height, width)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sizes", default="512x512,1024x576", help="comma-separated HxW")
    parser.add_argument("--antialias", default="analytic,none",
                        help="comma-separated modes among analytic, msaa, none")
    parser.add_argument("--out", default=None, help="also write the JSON object to this file")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the one-frame comparison of the analytic mode with the plain algorithm")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: what render_condition uses: 1 on a CPU device)")
    args = parser.parse_args()
    if args.frames < 3:
        parser.error("--frames must be >= 3")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(",")]
    aa_modes = [m.strip() for m in args.antialias.split(",") if m.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)  # as render_condition does (see limited_torch_threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    results = [bench_size(h, w, device, args.frames, args.warmup, aa, check=not args.no_check)
               for h, w in sizes for aa in aa_modes]
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except Exception:
        diffusers_version = None
    import moderngl

    out = {
        "bench": "recon_per_frame", "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type, "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers_version, "moderngl": moderngl.__version__,
        "anchor_ms": ANCHOR_MS,
        "anchor": "reference per-frame loop on H100 at 512x512 (performance-anchors.md section 5)",
        "target_ms": 10.0 if device.type == "cuda" else 150.0,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_peak_allocated_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                    if device.type == "cuda" else None),
        # This machine may be shared: the 1-minute load average around the run says how busy it was.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
    if device.type == "cuda":
        # The render must run on the NVIDIA EGL driver, not on a software fallback.
        out["gl_on_nvidia"] = all("nvidia" in r["gl_renderer"].lower() for r in results)
    text = json.dumps(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
