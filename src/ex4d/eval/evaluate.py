"""``ex4d eval``: does a generated video follow its camera, keep what was seen, and stay stable?

:func:`evaluate_video` reads the inputs (checked first, one-line :class:`InputError` for a bad one)
and returns the summary dict; :func:`write_report` writes ``summary.json``, ``report.html`` and
``contact_sheet.png``. Definitions: :mod:`ex4d.eval.metrics`, :mod:`ex4d.eval.camera_follow`,
docs/eval.md.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ex4d.errors import InputError

#: Default erosion (pixels) of the visible mask before PSNR/SSIM.
ERODE_MARGIN = 3
#: Report files, in the report folder.
OUTPUT_NAMES = ("summary.json", "report.html", "contact_sheet.png")


def load_camera(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(cam_from_world (T, 4, 4), K (T, 3, 3)) from a ``camera_<cam>.npz``; one-line error if unreadable."""
    from ex4d.io.files import require_file

    path = require_file(path, "camera file")
    try:
        with np.load(path, allow_pickle=False) as data:
            cam_from_world = np.asarray(data["cam_from_world"], np.float64)
            K = np.asarray(data["K"], np.float64)
    except Exception as exc:
        raise InputError(f"cannot read camera file {path} ({type(exc).__name__}); give a camera_<cam>.npz "
                         f"written by ex4d recon (keys cam_from_world, K)") from None
    if cam_from_world.ndim != 3 or cam_from_world.shape[1:] != (4, 4) or not np.isfinite(cam_from_world).all():
        raise InputError(f"camera file {path}: cam_from_world must be finite (T, 4, 4), got {cam_from_world.shape}")
    if K.shape == (3, 3):
        K = np.broadcast_to(K, (len(cam_from_world), 3, 3)).copy()
    if K.shape != (len(cam_from_world), 3, 3):
        raise InputError(f"camera file {path}: K must be (3, 3) or (T, 3, 3), got {K.shape}")
    return cam_from_world, K


def _read_frames(path, what: str) -> np.ndarray:
    from ex4d.io.video import read_video

    try:
        return read_video(path)[0]
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """bool (T, H, W) from a mask video whose every pixel is 0 or 255 (a lossless FFV1 ``mask_<cam>.mkv``)."""
    frames = _read_frames(path, "mask")
    grey = frames[..., 0]
    if not (np.all((frames == 0) | (frames == 255))):
        bad = float(np.mean((grey != 0) & (grey != 255)))
        raise InputError(f"mask {path} is not binary ({bad:.1%} of its pixels are neither 0 nor 255); give the "
                         f"lossless mask_<cam>.mkv that ex4d recon writes, not the H.264 mask_<cam>.mp4")
    return grey == 255


def load_depth0(path: str | os.PathLike, size: tuple[int, int],
                render_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame 0's (z-depth (H, W), valid (H, W)) from a depth.npz at ``size``; one-line error if unreadable or
    sized wrong. A depth at ``render_size`` (the recon's, when the video was generated at another size) is
    resized to ``size`` by nearest neighbour (z-depth must not be blended across edges)."""
    from ex4d.io.files import require_file
    from ex4d.types import DepthVideo

    path = require_file(path, "depth file")
    try:
        depth = DepthVideo.load(path)
        z, valid = np.asarray(depth.depth[0], np.float64), np.asarray(depth.valid[0], bool)
    except Exception as exc:
        raise InputError(f"cannot read depth file {path} ({type(exc).__name__}); give a depth.npz written by "
                         f"ex4d depth/recon") from None
    if render_size is not None and z.shape == tuple(render_size) != tuple(size):
        rows = np.minimum(((np.arange(size[0]) + 0.5) * z.shape[0] / size[0]).astype(int), z.shape[0] - 1)
        cols = np.minimum(((np.arange(size[1]) + 0.5) * z.shape[1] / size[1]).astype(int), z.shape[1] - 1)
        z, valid = z[rows][:, cols], valid[rows][:, cols]
    if z.shape != tuple(size):
        raise InputError(f"depth file {path} is {z.shape[0]}x{z.shape[1]} but the video is {size[0]}x{size[1]}; "
                         f"give the depth.npz of the same recon folder, or leave --depth out")
    return z, valid


def evaluate_video(video: str | os.PathLike, camera: str | os.PathLike, condition: str | os.PathLike | None = None,
                   mask: str | os.PathLike | None = None, depth: str | os.PathLike | None = None,
                   erode_margin: int = ERODE_MARGIN, progress=None, dino: str | os.PathLike | None = None,
                   clip: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """Evaluate ``video`` against ``camera`` (and the condition render, if given).

    depth: a depth.npz for the PnP route; ``None`` uses ``depth.npz`` beside the camera file when it
    exists and has the video's size, else the essential-matrix route. Returns (summary, arrays) where
    arrays holds frames for the contact sheet (``video``, ``condition``, ``mask``). dino / clip: local
    folders of the opt-in learned encoders (:mod:`ex4d.eval.learned`); None skips that metric.
    """
    from ex4d.eval.camera_follow import camera_errors, register_frames
    from ex4d.eval.metrics import erode, psnr, ssim, warping_error, _dis

    if erode_margin < 0:
        raise InputError(f"--erode must be >= 0 pixels, got {erode_margin}")
    if (condition is None) != (mask is None):
        raise InputError("give --condition and --mask together (the colour render and its lossless mask)")
    check_learned_folders(dino, clip)  # before any work
    cam_from_world, K = load_camera(camera)
    frames = _read_frames(video, "video")
    num, size = len(frames), frames.shape[1:3]
    if len(cam_from_world) != num:
        raise InputError(f"camera file {camera} has {len(cam_from_world)} frames but the video {video} has {num}; "
                         f"give the camera_<cam>.npz of the path that made this video")
    if num < 2:
        raise InputError(f"video {video} has 1 frame; at least 2 are needed to evaluate a camera path")
    cond = vis = None
    resize_note = ""
    if condition is not None:
        cond = _read_frames(condition, "condition")
        vis = read_binary_mask(mask)
        if vis.shape[1:3] != cond.shape[1:3]:
            raise InputError(f"mask is {vis.shape[1]}x{vis.shape[2]} but the condition is "
                             f"{cond.shape[1]}x{cond.shape[2]}; give the mask of the same recon")
        for name, arr in (("condition", cond), ("mask", vis)):
            if len(arr) != num:
                raise InputError(f"{name} has {len(arr)} frames but the video has {num}; they must match")
        render_size = cond.shape[1:3]
        if render_size != size:
            # Generation works at its own size (512x512 by default, squashed as the model was trained):
            # compare at the video's size, with the render, its mask and the cameras' K scaled to it.
            from ex4d.depth.normalize import scale_intrinsics
            from ex4d.io.video import resize_frames

            cond = resize_frames(cond, size)
            vis = resize_frames(vis[..., None].astype(np.uint8) * 255, size)[..., 0] >= 128
            K = np.stack([scale_intrinsics(k, render_size, size) for k in K])
            resize_note = (f"the condition, mask and K were scaled from the render's {render_size[0]}x"
                           f"{render_size[1]} to the video's {size[0]}x{size[1]}")
    depth_path, route_note = None, ""
    if depth is not None:
        depth_path = Path(depth)
    else:
        beside = Path(camera).parent / "depth.npz"
        if beside.is_file():
            depth_path = beside
    depth0 = valid0 = None
    if depth_path is not None:
        try:
            depth0, valid0 = load_depth0(depth_path, size, render_size=None if cond is None else render_size)
        except InputError as exc:
            if depth is not None:
                raise
            route_note = f"depth.npz beside the camera file not used ({exc})"
            depth_path = None

    reg = register_frames(frames, K[0], depth0=depth0, valid0=valid0)
    camera_summary = camera_errors(reg, cam_from_world)
    camera_summary["depth_file"] = None if depth_path is None else str(depth_path)
    notes = [n for n in (camera_summary.get("note"), route_note, resize_note) if n]
    if notes:
        camera_summary["note"] = "; ".join(notes)

    f01 = frames.astype(np.float32) / 255.0
    per_frame: dict[str, list] = {"psnr": [], "ssim": [], "visible_fraction": [], "warp_error": [None],
                                  "warp_error_generated": [None]}
    kept = None
    if cond is not None:
        c01 = cond.astype(np.float32) / 255.0
        for k in range(num):
            region = erode(vis[k], erode_margin)
            # Outside the visible mask the condition is black: fill it with the generated frame so that
            # SSIM windows straddling the mask edge compare like with like, then score only ``region``.
            composite = np.where(vis[k][..., None], c01[k], f01[k])
            per_frame["psnr"].append(psnr(f01[k], c01[k], region))
            per_frame["ssim"].append(ssim(f01[k], composite, region))
            per_frame["visible_fraction"].append(float(vis[k].mean()))
        kept = {"psnr_mean": _nanmean(per_frame["psnr"]), "ssim_mean": _nanmean(per_frame["ssim"]),
                "visible_fraction_mean": _nanmean(per_frame["visible_fraction"]), "erode_margin_px": erode_margin}
    else:
        for name in ("psnr", "ssim", "visible_fraction"):
            per_frame[name] = [None] * num
    dis = _dis()
    for k in range(1, num):
        whole, generated = warping_error(f01[k - 1], f01[k], None if vis is None else ~vis[k], dis=dis)
        per_frame["warp_error"].append(whole)
        per_frame["warp_error_generated"].append(generated if vis is not None else None)
    stability = {"warp_error_mean": _nanmean(per_frame["warp_error"][1:]),
                 "warp_error_generated_mean": (_nanmean(per_frame["warp_error_generated"][1:])
                                               if vis is not None else None)}
    learned = None
    if dino is not None or clip is not None:
        from ex4d.eval.learned import learned_consistency

        learned, learned_curves = learned_consistency(frames, dino=dino, clip=clip)
        per_frame.update(learned_curves)
    per_frame["rot_err_deg"] = camera_summary.pop("rot_err_deg")
    per_frame["trans_err"] = camera_summary.pop("trans_err")
    per_frame["registered"] = camera_summary.pop("registered")
    per_frame["inliers"] = camera_summary.pop("inliers")
    summary = {
        "video": str(video), "camera": str(camera), "condition": None if condition is None else str(condition),
        "mask": None if mask is None else str(mask), "num_frames": num, "size": [int(size[0]), int(size[1])],
        "camera_following": camera_summary,
        "kept_what_was_seen": kept,
        "temporal_stability": stability,
        "learned_consistency": learned,
        "per_frame": per_frame,
    }
    return _clean(summary), {"video": frames, "condition": cond, "mask": vis}


def check_learned_folders(dino, clip) -> None:
    """Fail before any work when an opt-in encoder folder is missing (exit 2, with the download command)."""
    from ex4d.eval.learned import check_folder

    for kind, folder in (("dino", dino), ("clip", clip)):
        if folder is not None:
            check_folder(kind, folder)


def _nanmean(values) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _clean(value):
    """JSON-safe: nan/inf -> None, numpy scalars -> Python, floats rounded to 6 digits."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6) if math.isfinite(float(value)) else None
    return value


def write_report(out_dir: str | os.PathLike, summary: dict, arrays: dict) -> dict[str, Path]:
    """Write summary.json, contact_sheet.png and report.html (self-contained) atomically into ``out_dir``."""
    from ex4d.eval.report import contact_sheet, render_html
    from ex4d.io.files import atomic_path

    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in OUTPUT_NAMES}
    sheet_png = contact_sheet(arrays["video"], arrays.get("condition"), arrays.get("mask"))
    with atomic_path(paths["contact_sheet.png"]) as tmp:
        Path(tmp).write_bytes(sheet_png)
    html = render_html(summary, sheet_png)
    with atomic_path(paths["report.html"]) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    with atomic_path(paths["summary.json"]) as tmp:  # last: its presence says the report is complete
        Path(tmp).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return paths
