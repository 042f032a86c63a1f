"""Pack a left and a right eye video into the frame-packed layouts that headsets and 3D displays play.

Layouts (``LAYOUTS``), for eyes of H x W:

* ``sbs``: side by side, full width: (H, 2W), left eye on the left.
* ``sbs-half``: side by side, half width: each eye squeezed to W/2 (rounded down to even, which H.264
  needs), (H, 2 * that): the "half SBS" most TVs and players expect.
* ``tb``: top-bottom (over-under), full height: (2H, W), left eye on top.
* ``anaglyph``: a red-cyan preview (H, W) for red (left) / cyan (right) glasses, made with Dubois'
  least-squares matrices (less retinal rivalry and better colour than the plain "red from left,
  green and blue from right" mix), applied to the sRGB values.

Stereo metadata, so that players unpack the frames by themselves:

* every packed H.264 stream (sbs, sbs-half, tb) carries the H.264 *frame packing arrangement* SEI
  (x264 ``frame-packing=3`` side by side, ``4`` top-bottom), inside the video bitstream, so in .mkv
  and .mp4 alike; FFmpeg-based players read it back as stereo3d side data;
* ``.mkv`` files also carry the Matroska ``StereoMode`` element (1 = side by side, left eye first;
  3 = top-bottom, left eye first), written by FFmpeg's Matroska muxer from the stream tag
  ``stereo_mode`` (``left_right`` / ``top_bottom``);
* ``.mp4`` files get no ISO-BMFF ``st3d`` box: FFmpeg writes it only from stream side data, which
  PyAV (checked with 18.1) cannot attach to an output stream;
* the anaglyph carries no stereo metadata: it is an ordinary 2D picture seen through glasses.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ex4d.errors import InputError
from ex4d.io.files import atomic_path, check_outputs, require_file
from ex4d.io.video import h264_options, pad_columns

LAYOUTS = ("sbs", "sbs-half", "tb", "anaglyph")
CONTAINERS = ("mkv", "mp4")
#: FFmpeg's names of the Matroska StereoMode values (the stream tag ``stereo_mode``).
MATROSKA_STEREO_MODE = {"sbs": "left_right", "sbs-half": "left_right", "tb": "top_bottom"}
#: Matroska StereoMode element values (the specification's numbers) of the names above.
MATROSKA_STEREO_MODE_VALUE = {"left_right": 1, "top_bottom": 3}
#: x264 ``frame-packing`` (H.264 frame packing arrangement SEI type): 3 side by side, 4 top-bottom.
X264_FRAME_PACKING = {"sbs": 3, "sbs-half": 3, "tb": 4}
#: Relative frame-rate difference under which two videos count as having the same fps.
FPS_TOLERANCE = 1e-3

#: Dubois' red-cyan anaglyph matrices (rows: output R, G, B; columns: the eye's R, G, B).
DUBOIS_LEFT = np.array([[0.456, 0.500, 0.176],
                        [-0.040, -0.038, -0.016],
                        [-0.015, -0.021, -0.005]])
DUBOIS_RIGHT = np.array([[-0.043, -0.088, -0.002],
                         [0.378, 0.734, -0.018],
                         [-0.072, -0.113, 1.226]])


def parse_layouts(text: str | Iterable[str]) -> list[str]:
    """``"sbs,tb"`` -> ["sbs", "tb"] (order kept, duplicates dropped); one-line InputError for others."""
    items = text.split(",") if isinstance(text, str) else list(text)
    layouts: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name not in LAYOUTS:
            raise InputError(f"unknown stereo layout {item.strip()!r} in --layouts; use a comma-separated list of "
                             f"{', '.join(LAYOUTS)}")
        if name not in layouts:
            layouts.append(name)
    if not layouts:
        raise InputError(f"--layouts is empty; use a comma-separated list of {', '.join(LAYOUTS)}")
    return layouts


def output_paths(out_dir: str | os.PathLike, prefix: str, layouts: Iterable[str], container: str = "mkv"
                 ) -> dict[str, Path]:
    """{layout: ``out_dir/<prefix>_<layout>.<container>``}."""
    if container not in CONTAINERS:
        raise InputError(f"unknown --container {container!r}; use {' or '.join(CONTAINERS)}")
    return {layout: Path(out_dir) / f"{prefix}_{layout}.{container}" for layout in layouts}


def half_width(width: int) -> int:
    """Width of one eye in ``sbs-half``: W/2 rounded down to even (H.264 4:2:0 needs even sizes)."""
    return max(2, (int(width) // 2) // 2 * 2)


def packed_size(layout: str, size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of a packed frame for eyes of ``size`` = (H, W)."""
    height, width = size
    return {"sbs": (height, 2 * width), "sbs-half": (height, 2 * half_width(width)), "tb": (2 * height, width),
            "anaglyph": (height, width)}[layout]


def anaglyph_dubois(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Red-cyan anaglyph of uint8 (..., H, W, 3) eyes with Dubois' matrices -> uint8 (..., H, W, 3)."""
    lf = np.asarray(left, dtype=np.float32) / 255.0
    rf = np.asarray(right, dtype=np.float32) / 255.0
    out = lf @ DUBOIS_LEFT.T.astype(np.float32) + rf @ DUBOIS_RIGHT.T.astype(np.float32)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def pack_frame(left: np.ndarray, right: np.ndarray, layout: str) -> np.ndarray:
    """One packed uint8 frame from uint8 (H, W, 3) eyes (see the module docstring for the layouts)."""
    from ex4d.io.video import resize_frames

    if layout == "sbs":
        return np.concatenate([left, right], axis=1)
    if layout == "tb":
        return np.concatenate([left, right], axis=0)
    if layout == "sbs-half":
        size = (left.shape[0], half_width(left.shape[1]))
        return np.concatenate([resize_frames(left[None], size)[0], resize_frames(right[None], size)[0]], axis=1)
    if layout == "anaglyph":
        return anaglyph_dubois(left, right)
    raise InputError(f"unknown stereo layout {layout!r}; use one of {', '.join(LAYOUTS)}")


class _StereoWriter:
    """H.264 writer of one packed video with its stereo metadata, into a temporary path."""

    def __init__(self, tmp: Path, layout: str, fps: float, crf: int):
        import av

        self.layout = layout
        self.container = av.open(str(tmp), mode="w")
        stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.pix_fmt = "yuv420p"
        if layout in X264_FRAME_PACKING and tmp.suffix.lower() == ".mkv":
            stream.metadata["stereo_mode"] = MATROSKA_STEREO_MODE[layout]
        self.crf = crf
        self.stream = stream
        self.opened = False
        self.pad = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        if not self.opened:  # the options depend on the width (ex4d.io.video.h264_options)
            packing = X264_FRAME_PACKING.get(self.layout)
            self.stream.options, self.pad = h264_options(
                frame.shape[1], self.crf, f"frame-packing={packing}" if packing is not None else "")
            self.stream.height, self.stream.width = frame.shape[0], frame.shape[1] + self.pad
            self.opened = True
        image = np.ascontiguousarray(pad_columns(frame, self.pad))
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            self.container.mux(packet)

    def close(self, flush: bool) -> None:
        try:
            if flush and self.opened:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()


def pack_frames(left_frames: Iterable[np.ndarray], right_frames: Iterable[np.ndarray], outputs: dict[str, Path],
                fps: float, crf: int = 16) -> dict[str, Path]:
    """Write every layout of ``outputs`` ({layout: path}) from uint8 (H, W, 3) eye frames, in one pass.

    Both iterables must yield the same number of frames of the same even size. The files are written
    under temporary names and renamed into place together at the end: a failure keeps none of them.
    Returns ``outputs``.
    """
    check_outputs(outputs.values())
    count = 0
    with contextlib.ExitStack() as stack:
        writers = {}
        for layout, path in outputs.items():
            tmp = stack.enter_context(atomic_path(path))
            writer = _StereoWriter(tmp, layout, fps, crf)
            writers[layout] = writer
        failed = True
        try:
            for left, right in _zip_exact(left_frames, right_frames):
                if left.shape != right.shape:
                    raise InputError(f"frame {count}: the left eye is {left.shape[1]}x{left.shape[0]} but the "
                                     f"right eye is {right.shape[1]}x{right.shape[0]}")
                if left.shape[0] % 2 or left.shape[1] % 2:
                    raise InputError(f"the eyes are {left.shape[1]}x{left.shape[0]}; H.264 needs even sizes")
                for layout, writer in writers.items():
                    writer.write(pack_frame(left, right, layout))
                count += 1
            if not count:
                raise InputError("the stereo videos have no frames")
            failed = False
        finally:
            for writer in writers.values():
                writer.close(flush=not failed)
    return outputs


def _zip_exact(left: Iterable, right: Iterable) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    sentinel = object()
    left_it, right_it = iter(left), iter(right)
    index = 0
    while True:
        a, b = next(left_it, sentinel), next(right_it, sentinel)
        if a is sentinel and b is sentinel:
            return
        if a is sentinel or b is sentinel:
            raise InputError(f"the {'left' if a is sentinel else 'right'} eye ended at frame {index} before the other")
        yield np.asarray(a), np.asarray(b)
        index += 1


def check_pair(left: str | os.PathLike, right: str | os.PathLike) -> tuple[int, tuple[int, int], float]:
    """Probe both eyes; refuse (one line) a pair that differs in frame count, size or fps.

    Returns (frame count, (H, W), fps) shared by both.
    """
    from ex4d.io.video import probe_video

    probes = {}
    for name, path in (("left", left), ("right", right)):
        probes[name] = probe_video(path)
    (nl, sl, fl), (nr, sr, fr) = probes["left"], probes["right"]
    what = f"left {left} and right {right}"
    if sl != sr:
        raise InputError(f"the eyes differ in size: {what} are {sl[1]}x{sl[0]} and {sr[1]}x{sr[0]}; give videos of "
                         f"the same size (ex4d recon --cam stereo writes the matching left eye, left_<cam>.mp4)")
    if nl != nr:
        raise InputError(f"the eyes differ in frame count: {what} have {nl} and {nr} frames; give videos with the "
                         f"same frames (ex4d recon --cam stereo writes the matching left eye, left_<cam>.mp4)")
    if abs(fl - fr) > FPS_TOLERANCE * max(fl, fr):
        raise InputError(f"the eyes differ in frame rate: {what} are {fl:g} and {fr:g} fps; give videos with the "
                         f"same fps")
    if sl[0] % 2 or sl[1] % 2:
        raise InputError(f"the eyes are {sl[1]}x{sl[0]}; H.264 needs even sizes")
    return nl, sl, fl


def pack_videos(left: str | os.PathLike, right: str | os.PathLike, out_dir: str | os.PathLike, *,
                layouts: Iterable[str] = LAYOUTS, prefix: str | None = None, container: str = "mkv",
                crf: int = 16) -> dict[str, Path]:
    """Pack the videos ``left`` and ``right`` into ``out_dir/<prefix>_<layout>.<container>``.

    prefix: default the right eye's file stem (``color_stereo`` -> ``color_stereo_sbs.mkv``).
    The pair is checked first (:func:`check_pair`). Returns {layout: path}.
    """
    from ex4d.io.video import iter_video

    left, right = require_file(left, "left eye video"), require_file(right, "right eye video")
    outputs = output_paths(out_dir, prefix or right.stem, parse_layouts(layouts), container)
    check_outputs(outputs.values())  # before any decoding
    _, _, fps = check_pair(left, right)
    return pack_frames(iter_video(left), iter_video(right), outputs, fps, crf=crf)


def read_stereo_metadata(path: str | os.PathLike) -> dict:
    """What a player sees of a packed file: ``stereo_mode`` (the Matroska tag, or None) and ``stereo3d_type``
    (FFmpeg's AVStereo3DType of the first decoded frame: 1 side by side, 2 top-bottom; None if absent)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        mode = stream.metadata.get("stereo_mode")
        stereo_type = None
        for frame in container.decode(stream):
            # (PyAV 18's side-data container iterates over its items, not keys: look the type up directly.)
            data = frame.side_data.get(av.sidedata.sidedata.Type.STEREO3D)
            if data is not None:
                stereo_type = int.from_bytes(bytes(data)[:4], "little", signed=True)
            break
    return {"stereo_mode": mode, "stereo3d_type": stereo_type}


def pack_generated(left: str | os.PathLike, right: str | os.PathLike, outputs: dict[str, Path],
                   crf: int = 16) -> dict[str, Path]:
    """Pack the left eye (recon's ``left_<cam>.mp4``) with a generated right eye (``ex4d_<cam>.mp4``).

    The generator may change the size (``--size``) and the frame count (``--gen-num-frames``): the left eye
    is fitted to the right one, resized bilinearly and its frames picked as the generator picks them
    (``linspace(0, T - 1, T')``); the frame rate is the generated video's. Returns ``outputs``.
    """
    from ex4d.io.video import iter_video, probe_video

    count, size, fps = probe_video(right)
    left_count = probe_video(left)[0]
    keep = set(np.linspace(0, left_count - 1, count).astype(int).tolist())
    picked = (frame for k, frame in enumerate(iter_video(left, size=size)) if k in keep)
    if len(keep) != count:  # more generated frames than left frames: repeat as the pick says
        frames = list(iter_video(left, size=size))
        picked = (frames[k] for k in np.linspace(0, left_count - 1, count).astype(int))
    return pack_frames(picked, iter_video(right), outputs, fps, crf=crf)
