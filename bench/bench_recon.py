"""Per-frame DW-Mesh build + render time (the reconstruction stage's inner loop).

For each size (512x512 and 1024x576 by default) and each antialiasing setting, runs the same work
as ``ex4d.render.condition.render_condition`` does per frame -- build frame k's DW-Mesh on the
device (torch), render it from a moving camera with moderngl/EGL, threshold alpha > 125/255 and
multiply the colour by the mask -- on a synthetic depth video that changes every frame. Reports
the median of ``--frames`` frames after ``--warmup`` frames, split into build / render / post.

Prints ONE JSON object. Anchor: the reference's per-frame loop on one H100 (mesh build with faces
regenerated every frame + nvdiffrast rasterize/interpolate/antialias + threshold + host copy) takes
16.6-18.5 ms at 512x512 (performance-anchors.md section 5); ``ratio_to_anchor`` divides our median
by 16.6 ms. Targets: <= 150 ms/frame at 512x512 on a 2-core CPU, <= 10 ms/frame on the GPU.

    python bench/bench_recon.py [--device cpu|cuda|auto] [--frames 20] [--sizes 512x512,1024x576]
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
from ex4d.render.condition import MASK_ALPHA_THRESHOLD  # noqa: E402
from ex4d.render.rasterizer import MeshRenderer  # noqa: E402

ANCHOR_MS = 16.6  # reference, H100, 512x512, per frame (lower end of 16.6-18.5 ms)


def _git_commit() -> str:
    if os.environ.get("EX4D_GIT_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["EX4D_GIT_COMMIT"]
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


def bench_size(height: int, width: int, device: torch.device, frames: int, warmup: int, antialias: str) -> dict:
    total = frames + warmup
    depth, rgb = _scene(height, width, total, device)
    K = reference_intrinsics(height, width)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_build, t_render, t_post, t_total, t_cpu = [], [], [], [], []
    visible = []
    mask = np.zeros((height, width), dtype=bool)
    colour = np.zeros((height, width, 3), dtype=np.float32)
    with MeshRenderer(height, width, antialias=antialias) as renderer:
        for k in range(total):
            sync()
            c0 = time.process_time()
            t0 = time.perf_counter()
            mesh = build_dw_mesh(depth[k], rgb[k], K)
            sync()
            t1 = time.perf_counter()
            rgba = renderer.render(mesh, _orbit_pose(k, total), K)
            t2 = time.perf_counter()
            np.greater(rgba[..., 3], np.float32(MASK_ALPHA_THRESHOLD), out=mask)  # as render_condition
            np.multiply(rgba[..., :3], mask[..., None], out=colour)
            t3 = time.perf_counter()
            c3 = time.process_time()
            if k >= warmup:
                t_cpu.append(c3 - c0)
                t_build.append(t1 - t0)
                t_render.append(t2 - t1)
                t_post.append(t3 - t2)
                t_total.append(t3 - t0)
                visible.append(float(mask.mean()))
        gl_renderer, aa = renderer.gl_renderer, renderer.antialias_method
    del colour

    def ms(x):
        return round(1000 * statistics.median(x), 3)

    return {"size": [height, width], "vertices": height * width, "faces": 2 * (height - 1) * (width - 1),
            "antialias": aa, "gl_renderer": gl_renderer, "frames_timed": frames, "warmup": warmup,
            "median_ms": ms(t_total), "build_ms": ms(t_build), "render_ms": ms(t_render), "post_ms": ms(t_post),
            "min_ms": round(1000 * min(t_total), 3),
            # CPU time of this process (all its threads, llvmpipe's included): less sensitive than
            # wall time to other processes on a shared machine.
            "cpu_time_ms": ms(t_cpu), "max_ms": round(1000 * max(t_total), 3),
            "visible_fraction": round(statistics.mean(visible), 4),
            "ratio_to_anchor": round(statistics.median(t_total) * 1000 / ANCHOR_MS, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sizes", default="512x512,1024x576", help="comma-separated HxW")
    parser.add_argument("--antialias", default="analytic,none",
                        help="comma-separated modes among analytic, msaa, none")
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
        torch.set_num_threads(1)  # as render_condition does (see single_threaded_torch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    results = [bench_size(h, w, device, args.frames, args.warmup, aa) for h, w in sizes for aa in aa_modes]
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
