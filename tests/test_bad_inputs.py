"""Bad command lines, one table: every row must fail with exit 1 or 2 (never 3, "internal error"),
one line on stderr containing a keyword, and no file written or changed anywhere.

To add a case, append a :class:`Case` to ``CASES`` (or a module-level list concatenated into it).
``argv`` is formatted with these paths:

* ``{in}``: a folder of inputs, fresh for every case: ``video.mp4`` and ``depth.npz`` (synthetic
  boxes, 5 frames, 64x64), ``video7.mp4`` (7 frames), ``color_30.mp4`` / ``mask_30.mp4`` /
  ``mask_30.mkv`` (a 5-frame 32x32 render pair), ``color_7.mp4`` / ``mask_7.mkv`` (7 frames),
  ``depth3.npz`` (3 frames), ``adapter.json`` (a file standing in for an adapter path),
  ``deep.json`` (a pose file nested 100,000 deep), ``huge_int.json`` (a yaw of 10**400),
  ``two_poses.npz`` (2 poses), ``big.mp4`` (one 4352x2048 frame, over the --resize keep cap);
* ``{out}``: an output folder that does not exist yet;
* ``{models}``: tiny Wan + adapter weights, so that no row fails for missing weights.

``setup(in_dir, out_dir)`` may create more files before the run (e.g. a foreign file at an output
path); they are part of the "nothing changed" snapshot.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from ex4d.cli import main
from ex4d.io.video import write_video

tiny_wan = pytest.importorskip("tiny_wan")


@dataclass
class Case:
    name: str
    argv: str  # one string, split on whitespace after formatting (paths here have no spaces)
    keyword: str  # must appear (case-insensitive) in the error line
    code: int = 1
    setup: Callable[[Path, Path], None] | None = None
    check: Callable[[str], None] | None = None  # more checks of the error line
    marks: tuple = ()  # pytest marks, e.g. a strict xfail for a known open bug


def _foreign(relpath: str, text: str = "the user's own file\n"):
    """Setup: a file that ex4d did not write, at ``{out}/relpath``."""

    def setup(in_dir: Path, out_dir: Path) -> None:
        path = out_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return setup


def _suggests_4k1(option: str = "--num-frames"):
    """Check: the ``<option> N`` that the message suggests (its last one) is 4k+1, so that the whole
    pipeline (generation included) accepts it."""

    def check(line: str) -> None:
        values = [int(v) for v in re.findall(re.escape(option) + r" (\d+)", line)]
        assert values, f"no {option} suggestion in: {line}"
        assert (values[-1] - 1) % 4 == 0, f"suggests {option} {values[-1]}, which generation rejects: {line}"

    return check


GEN = "generate --models-dir {models} --device cpu --size 32x32 --steps 1"
GEN_IO = GEN + " --color {in}/color_30.mp4 -o {out}/gen.mp4"
RECON = "recon {in}/video.mp4 --depth {in}/depth.npz --cam 30 --num-frames 5 --resize keep --device cpu -o {out}"
RUN = ("run {in}/video.mp4 --depth {in}/depth.npz --cam 30 --num-frames 5 --resize keep --device cpu -o {out} "
       "--models-dir {models} --size 16x16 --steps 1")
DEPTH = "depth {in}/video.mp4 --depth {in}/depth.npz --num-frames 5 --device cpu -o {out}"
SYNTH = "synth -o {out} --num-frames 2 --size 32x32"

CASES: list[Case] = [
    # --- generate -o X.mp4 writes X.json beside it; never over a foreign file.
    Case("generate-record-over-foreign-json", GEN_IO, "did not write", setup=_foreign("gen.json")),
    Case("generate-over-foreign-mp4", GEN_IO, "did not write", setup=_foreign("gen.mp4")),
    # --- Outputs that are inputs (the mask as given, the substituted .mkv, the colour, the adapter).
    Case("generate-onto-given-mask", GEN + " --color {in}/color_30.mp4 --mask {in}/mask_30.mp4 -o {in}/mask_30.mp4",
         "input"),
    Case("generate-onto-mask-mp4-beside-the-mkv-used", GEN + " --color {in}/color_30.mp4 -o {in}/mask_30.mp4",
         "did not write"),
    Case("generate-onto-colour", GEN + " --color {in}/color_30.mp4 -o {in}/color_30.mp4", "input"),
    Case("generate-record-onto-adapter", GEN + " --color {in}/color_30.mp4 --adapter {in}/adapter.json "
         "-o {in}/adapter.mp4", "input"),
    Case("synth-over-foreign-video", SYNTH, "did not write", setup=_foreign("video.mp4")),
    Case("run-record-over-foreign-json", RUN, "did not write", setup=_foreign("ex4d_30.json")),
    Case("run-video-over-foreign-mp4", RUN, "did not write", setup=_foreign("ex4d_30.mp4")),
    Case("generate-not-mp4", GEN + " --color {in}/color_30.mp4 -o {out}/gen.mkv", ".mp4"),
    # --- Numbers, checked before any work.
    Case("generate-cfg-nan", GEN_IO + " --cfg nan", "--cfg"),
    Case("generate-cfg-inf", GEN_IO + " --cfg inf", "--cfg"),
    Case("generate-cfg-huge", GEN_IO + " --cfg 1e9", "--cfg"),
    Case("generate-fps-negative", GEN_IO + " --fps -1", "--fps"),
    Case("generate-fps-nan", GEN_IO + " --fps nan", "--fps"),
    Case("generate-fps-inf", GEN_IO + " --fps inf", "--fps"),
    Case("generate-fps-tiny", GEN_IO + " --fps 1e-9", "--fps"),
    Case("generate-fps-huge", GEN_IO + " --fps 1000", "--fps"),
    Case("generate-fps-text", GEN_IO + " --fps fast", "--fps"),
    Case("generate-seed-negative", GEN_IO + " --seed -1", "--seed"),
    Case("generate-seed-too-big", GEN_IO + f" --seed {2**63}", "--seed"),
    Case("generate-steps-zero", GEN_IO + " --steps 0", "--steps"),
    Case("generate-steps-huge", GEN_IO + " --steps 1000000", "--steps"),
    Case("generate-size-8192", GEN_IO + " --size 8192x8192", "2048"),
    Case("generate-size-too-wide", GEN_IO + " --size 512x4096", "2048"),
    Case("generate-size-not-16", GEN_IO + " --size 500x500", "multiple of 16"),
    Case("generate-window-not-4k1", GEN_IO + " --window 10", "--window"),
    Case("generate-window-too-small", GEN_IO + " --window 1", "--window"),
    Case("generate-overlap-not-below-window", GEN_IO + " --window 9", "--overlap"),
    Case("generate-overlap-zero", GEN_IO + " --overlap 0", "--overlap"),
    Case("generate-num-frames-zero", GEN_IO + " --num-frames 0", "--num-frames"),
    Case("generate-num-frames-not-4k1", GEN_IO + " --num-frames 6", "4k+1", check=_suggests_4k1()),
    Case("generate-vram-budget-nan", GEN_IO + " --vram-budget nan", "--vram-budget"),
    Case("recon-fps-negative", RECON + " --fps -1", "--fps"),
    Case("recon-fps-nan", RECON + " --fps nan", "--fps"),
    Case("recon-fps-tiny", RECON + " --fps 1e-9", "--fps"),
    Case("recon-num-frames-zero", RECON + " --num-frames 0", "--num-frames"),
    Case("recon-keep-too-big", "recon {in}/big.mp4 --depth {in}/depth.npz --num-frames 1 --resize keep -o {out}",
         "megapixels"),
    Case("run-fps-nan", RUN + " --fps nan", "--fps"),
    Case("run-fps-negative", RUN + " --fps -1", "--fps"),
    Case("run-old-out-fps-negative", RUN + " --out-fps -1", "--fps"),
    Case("run-cfg-nan", RUN + " --cfg nan", "--cfg"),
    Case("run-seed-negative", RUN + " --seed -1", "--seed"),
    Case("run-steps-zero", RUN + " --steps 0", "--steps"),
    Case("run-size-8192", RUN + " --size 8192x8192", "2048"),
    Case("run-window-overlap", RUN + " --window 9", "--overlap"),
    Case("run-num-frames-zero", RUN + " --num-frames 0", "--num-frames"),
    Case("depth-num-frames-zero", DEPTH + " --num-frames 0", "--num-frames"),
    Case("depth-keep-too-big", "depth {in}/big.mp4 --depth {in}/depth.npz --num-frames 1 --resize keep -o {out}",
         "megapixels"),
    Case("synth-size-8192", SYNTH + " --size 8192x8192", "2048"),
    Case("synth-fps-zero", SYNTH + " --fps 0", "--fps"),
    Case("synth-fps-nan", SYNTH + " --fps nan", "--fps"),
    Case("synth-num-frames-zero", SYNTH + " --num-frames 0", "--num-frames"),
    Case("synth-num-frames-huge", SYNTH + " --num-frames 1000000", "--num-frames"),
    # --- User errors, not "internal error".
    Case("recon-missing-depth-file", RECON.replace("{in}/depth.npz", "{in}/missing.npz"), "not found"),
    Case("run-missing-depth-file", RUN.replace("{in}/depth.npz", "{in}/missing.npz"), "not found"),
    Case("depth-missing-depth-file", DEPTH.replace("{in}/depth.npz", "{in}/missing.npz"), "not found"),
    Case("recon-unknown-depth-estimator", RECON.replace("{in}/depth.npz", "depthcrafterr"), "unknown --depth"),
    Case("recon-deeply-nested-pose-file", RECON.replace("--cam 30", "--cam {in}/deep.json"), "nested"),
    Case("recon-huge-int-in-pose-file", RECON.replace("--cam 30", "--cam {in}/huge_int.json"), "finite number"),
    Case("recon-pose-count", RECON.replace("--cam 30", "--cam {in}/two_poses.npz"), "--resample"),
    Case("recon-missing-pose-file", RECON.replace("--cam 30", "--cam {in}/missing.json"), "not found"),
    Case("recon-bad-cam-parameter", RECON.replace("--cam 30", "--cam zoom_in:travel=5"), "travel"),
    # --- Every suggested value is valid for the whole pipeline (4k+1 where generation follows).
    Case("run-num-frames-not-4k1", RUN.replace("--num-frames 5", "--num-frames 6"), "4k+1", check=_suggests_4k1()),
    Case("run-num-frames-50", RUN.replace("--num-frames 5", "--num-frames 50"), "4k+1", check=_suggests_4k1()),
    Case("generate-colour-not-4k1", GEN + " --color {in}/color_7.mp4 -o {out}/gen.mp4", "4k+1",
         check=_suggests_4k1()),
    Case("generate-more-frames-than-video", GEN_IO + " --num-frames 9", "--num-frames", check=_suggests_4k1()),
    Case("recon-video-too-short", "recon {in}/video7.mp4 --depth {in}/depth.npz --num-frames 49 -o {out}",
         "--num-frames", check=_suggests_4k1()),
    Case("recon-depth-file-too-short", RECON.replace("{in}/depth.npz", "{in}/depth3.npz"), "--num-frames",
         check=_suggests_4k1()),
    Case("generate-window-suggestion", GEN_IO + " --window 10", "--window", check=_suggests_4k1("--window")),
]


# ---------------------------------------------------------------------------------------------
# Inputs, made once per module and copied for every case


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    src = root / "in"
    assert main(["synth", "-o", str(src), "--scene", "boxes", "--num-frames", "5", "--size", "64x64"]) == 0
    seven = root / "seven"
    assert main(["synth", "-o", str(seven), "--scene", "boxes", "--num-frames", "7", "--size", "64x64"]) == 0
    shutil.copy(seven / "video.mp4", src / "video7.mp4")
    with np.load(src / "depth.npz") as data:
        np.savez(src / "depth3.npz", depth=data["depth"][:3])
    rng = np.random.default_rng(0)
    for count, cam in ((5, "30"), (7, "7")):
        color = (rng.random((count, 32, 32, 3)) * 255).astype(np.uint8)
        mask = np.full((count, 32, 32), 255, np.uint8)
        mask[1:, :, 20:] = 0
        write_video(src / f"color_{cam}.mp4", color, 10)
        write_video(src / f"mask_{cam}.mkv", mask, 10, codec="ffv1")
    write_video(src / "mask_30.mp4", np.repeat(np.full((5, 32, 32), 255, np.uint8)[..., None], 3, axis=-1), 10)
    write_video(src / "big.mp4", np.zeros((1, 2048, 4352, 3), np.uint8), 10)
    (src / "adapter.json").write_text("{}")
    (src / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (src / "huge_int.json").write_text('{"pivot": [0, 0, 2], "keyframes": [{"yaw": 1%s}, {"yaw": 2}]}' % ("0" * 400))
    np.savez(src / "two_poses.npz", cam_from_world=np.repeat(np.eye(4)[None], 2, axis=0))
    for ledger in src.glob(".ex4d-files.json"):
        ledger.unlink()  # the inputs are the user's files, not ex4d's

    models = root / "models"
    tiny_wan.write_tiny_models_dir(models)
    return src, models


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("case", [pytest.param(c, marks=c.marks, id=c.name) for c in CASES])
def test_bad_command_line(case: Case, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    src, models = inputs
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    shutil.copytree(src, in_dir)
    if case.setup is not None:
        case.setup(in_dir, out_dir)
    before = _snapshot(tmp_path)
    argv = case.argv.format(**{"in": in_dir, "out": out_dir, "models": models}).split()
    capsys.readouterr()

    code = main(argv)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, f"exit {code}, stderr: {err}"
    assert code in (1, 2)
    assert len(lines) == 1, f"expected one line, got: {err}"
    line = lines[0]
    assert line.startswith("error: ") and "internal error" not in line, line
    assert case.keyword.lower() in line.lower(), line
    if case.check is not None:
        case.check(line)
    after = _snapshot(tmp_path)
    after = {k: v for k, v in after.items() if not k.startswith("hf/")}
    assert after == before, f"files written or changed: {sorted(set(after.items()) ^ set(before.items()))}"


def test_case_names_are_unique():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
