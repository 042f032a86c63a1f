"""Make the pictures of docs/stereo.md from the synthetic "boxes" scene (exact depth, no weights needed).

    python bench/make_stereo_figures.py                 # writes docs/images/stereo_*.png (a few seconds)
    python bench/make_stereo_figures.py --out /tmp/figs --overwrite

The right eye is the real DW-Mesh render of ``--cam stereo`` (ex4d.stereo.render, frame 0, before the
frame-0 fill), with a normal lens (f = 0.8 W, 64 degrees across). Prints one JSON object with the numbers
quoted in the docs (visible fractions, disparities).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SIZE = (150, 200)  # (H, W)
HOLE = np.array([1.0, 0.0, 1.0], np.float32)  # magenta: not seen by the left eye (the model fills it)


def render_right(spec: str, frame: np.ndarray, depth: np.ndarray, K: np.ndarray):
    from ex4d.camera import make_trajectory
    from ex4d.stereo.render import iter_stereo_condition

    traj = make_trajectory(spec, num_frames=1, size=SIZE, K=K, depth0=depth, depth_metric=True)
    color, mask = next(iter(iter_stereo_condition([frame], [depth], K, traj, size=SIZE, num_frames=1,
                                                  fill_first_frame=False, device="cpu")))
    return color, mask, traj


def labelled(image: np.ndarray, text: str):
    from PIL import Image, ImageDraw

    picture = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
    canvas = Image.new("RGB", (picture.width, picture.height + 16), "white")
    canvas.paste(picture, (0, 16))
    ImageDraw.Draw(canvas).text((3, 2), text, fill="black")
    return np.asarray(canvas).astype(np.float32) / 255


def row(*images: np.ndarray) -> np.ndarray:
    gap = np.ones((images[0].shape[0], 4, 3), np.float32)
    parts = []
    for image in images:
        parts += [image, gap]
    return np.concatenate(parts[:-1], axis=1)


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from ex4d.io.files import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).save(tmp, format="PNG", optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/images", help="folder for the PNGs (default docs/images)")
    parser.add_argument("--overwrite", action="store_true", help="replace PNGs ex4d did not write (default: refuse)")
    args = parser.parse_args(argv)

    from ex4d.io.files import write_policy
    from ex4d.stereo.pack import anaglyph_dubois
    from ex4d.synthetic import render_view

    height, width = SIZE
    K = np.array([[0.8 * width, 0, width / 2], [0, 0.8 * width, height / 2], [0, 0, 1.0]])
    view = render_view("boxes", 0, np.eye(4), K, SIZE)
    left = view["rgb"]
    depth = np.where(view["hit"], view["depth"], 100.0).astype(np.float32)
    out = Path(args.out)
    numbers: dict = {"size": list(SIZE), "focal_px": float(K[0, 0])}
    with write_policy(overwrite=args.overwrite):
        # 1. The pair: left = source, right = render (holes in magenta), right after the frame-0 fill.
        from ex4d.stereo.render import fill_disocclusions

        color, mask, traj = render_right("stereo:baseline=0.1x", left, depth, K)
        shown = np.where(mask[..., None], color, HOLE)
        save_png(out / "stereo_pair.png", row(labelled(left, "left eye = source"),
                                              labelled(shown, "right eye, baseline 0.1x"),
                                              labelled(fill_disocclusions(color, mask), "frame 0 after the fill")))
        numbers["pair_visible_fraction"] = float(mask.mean())

        # 2. Convergence: anaglyphs (red-cyan, Dubois) converged on the subject and at infinity.
        anaglyphs = []
        for converge in ("subject", "infinity"):
            color, mask, traj = render_right(f"stereo:baseline=0.1x,converge={converge}", left, depth, K)
            right = fill_disocclusions(color, mask)
            image = anaglyph_dubois(np.rint(left * 255).astype(np.uint8), np.rint(right * 255).astype(np.uint8))
            anaglyphs.append(labelled(image.astype(np.float32) / 255, f"converge={converge}"))
            numbers[f"shift_px_{converge}"] = traj.settings["principal_point_shift_px"]
        save_png(out / "stereo_convergence.png", row(*anaglyphs))

        # 3. What the left eye never saw, for growing baselines (white: seen; black: for the model to fill).
        masks = []
        for fraction in ("0.0333x", "0.1x", "0.2x"):
            color, mask, traj = render_right(f"stereo:baseline={fraction}", left, depth, K)
            numbers[f"visible_fraction_{fraction}"] = float(mask.mean())
            numbers[f"subject_disparity_before_shift_px_{fraction}"] = traj.settings["principal_point_shift_px"]
            masks.append(labelled(np.repeat(mask[..., None].astype(np.float32), 3, axis=-1),
                                  f"baseline {fraction}: {mask.mean():.1%} seen"))
        save_png(out / "stereo_baselines.png", row(*masks))
    numbers["files"] = sorted(str(p) for p in out.glob("stereo_*.png"))
    numbers["bytes"] = {p.name: p.stat().st_size for p in out.glob("stereo_*.png")}
    print(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
