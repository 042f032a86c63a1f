"""One video to the final re-filmed video through the real pipeline, per stage, with random full-size weights.

The stages are the ones ``ex4d run`` chains (ex4d.pipeline): ``load_clip`` -> ``estimate_depth``
(DepthCrafter, writes depth.npz) -> ``run_recon`` (DW-Mesh + render along ``--cam``, writes the
colour/mask videos) -> ``run_generate`` (reads them, T5 + CLIP, 3 VAE encodes, the sampler, the
VAE decode, writes ex4d_<cam>.mp4). Every run writes into a fresh folder, so nothing is reused.

Models are the exact full-size architectures with random weights, built on the GPU without files
(bench_generate.build_full for Wan2.1-I2V-14B + T5 + CLIP + VAE, bench_depth.build_models for
DepthCrafter), handed to the real loaders' consumers: the generation pipeline is built by
``build_pipeline`` with the preset's performance options and placed in ``run_generate``'s model
cache under the options' key; the depth estimator is a ``DepthCrafter`` object passed to
``estimate_depth``. Weight values do not change speed or memory.

Presets (one process each; attention backends and compile caches are process-global):
  full         25 steps, CFG 5 (2 forwards a step), bf16, compiled          goal <= 32 s
  fast         4 steps, guidance 1 (1 forward a step), bf16, compiled       goal <= 8 s
  full-fp8     full with --fp8 (fp8 compute), compiled
  fast-fp8     fast with --fp8
  lowvram-fp8  full with --fp8 --low-vram --vram-budget GIB, compiled       goal <= 16 GiB peak, <= 1.2x full-fp8
``--preset`` with ``--steps``/``--guidance`` overrides the sampler numbers.

Depth: DepthCrafter with ``ex4d depth --fast-kernels --fp16-encode``'s settings (``--depth-compile``:
``--compile --fp16-encode``, whose first call compiles for minutes). lowvram-fp8 keeps DepthCrafter
resident beside the generation's ``--vram-budget`` (default 11.5 GiB + its 4.1 GiB of weights).

``--depth vda`` takes depth from Video Depth Anything Small instead (random full-size weights, as
bench/bench_vda.py builds it). ``--cprofile FILE`` profiles one more run (not in the medians) with
cProfile: where the seconds outside the denoising kernels go.

Warm: the models are resident and compiled (one untimed warm-up run of the whole chain first),
as in ``ex4d batch`` and the app. Per stage: median seconds over ``--runs`` runs and the peak GPU
memory of that stage (``max_memory_allocated``, weights included; reset before each stage).
Cold: ``build_s`` (random weights materialised on the GPU, not a disk read) and ``setup_s``
(merge, fp8 conversion, placement) and the warm-up run (includes compilation) are reported;
a cold load from disk is not measured here (that needs the 60 GB of real files on the machine).

Random weights generate noise-like frames, which x264 encodes several times slower than a natural
video, so ``generate_io`` is longer than with the real weights. ``final_encode_s_median`` times the
final encode on the last run's output and on the source clip's frames (same shape). With
``--no-streamed-decode`` (the video is encoded after the decode, not during it),
``total_s_median_with_source_like_final_encode`` swaps the one for the other (derived, not a run);
with the streamed decode the encode overlaps the decode, so no such swap is made (null).
``generate_parts_s_median`` splits ``generate_io``: reading the condition videos (``load_condition``),
the prompt-embedding cache lookup, waiting for frame 0's work and the condition's encodes run ahead
(``first_frame_wait``, ``condition_wait``), and closing the final video's writer (the encode's tail after the
last decoded frame when streamed, the whole encode when not). On a GPU, CLIP and the first-frame
latent are computed on a helper thread (``ahead_first_frame_context_s``, not in the total, and no
longer in ``text_and_image_encoders`` / ``vae_encode``), started during recon from the colour
encoder's frame 0 as batch jobs chain the two (``ex4d.pipeline.start_ahead_of_recon``), and the
condition's two VAE encodes follow there frame by frame (then ``vae_encode`` is nearly nothing);
``--no-condition-ahead`` leaves the condition's encodes to the sampler call, ``--no-recon-first-frame``
starts frame 0's work only while the condition loads, and ``--no-first-frame-ahead`` computes it in
the sampler call instead. The helper's calls are also timed until they return, before the wait for
their GPU work (``ahead_*_launch_s``; for the condition's chunk encodes and their finish only that):
when that is close to the work's GPU time, the helper thread (launching kernels, waiting for the GIL
beside recon's threads), not the GPU, sets the pace.

``--x264-lookahead N`` sets the final video's rc-lookahead, ``--condition-lookahead N`` that of recon's
condition videos (0: preset medium's 40), ``--loop-torch-threads N`` the torch CPU threads of recon's
render loop, ``--no-loop-overlap`` finishes each rendered frame in line (not on helper threads beside
the next frame's draw), ``--loop-finish-threads N`` sets how many helper threads finish frames, for
A/B runs of those settings.

Prints ONE JSON object (commit from EX4D_COMMIT or git).

  python bench/bench_e2e.py --preset full               # on an H100 (~3 min with 3 runs; the warm-up
                                                        # compiles the DiT)
  python bench/bench_e2e.py --preset lowvram-fp8 --vram-budget 11.5
  python bench/bench_e2e.py --tiny --preset full        # CPU check of the script itself (tiny models)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_generate import build_full, build_tiny, git_commit, note  # noqa: E402

PRESETS = {
    "full": dict(preset="full", fp8=False, low_vram=False),
    "fast": dict(preset="fast", fp8=False, low_vram=False),
    "full-fp8": dict(preset="full", fp8=True, low_vram=False),
    "fast-fp8": dict(preset="fast", fp8=True, low_vram=False),
    "lowvram-fp8": dict(preset="full", fp8=True, low_vram=True),
}
SAMPLER = {"full": (25, 5.0), "fast": (4, 1.0)}  # (steps, guidance) if GenerateOptions has no preset
GOALS = {"full": {"total_s": 32.0}, "fast": {"total_s": 8.0}, "lowvram-fp8": {"peak_gib": 16.0}}
#: Reference side by side (performance-anchors.md): 25 steps of its DiT with the unmerged LoRA, its
#: 3 VAE encodes + 1 decode, its DepthCrafter at 512x512 (section 6); T5, CLIP, rendering and the
#: reference's 6-7 s DiT onload are not in this sum.
REFERENCE_SUM_S = 65.9 + 2.7 + 4.20


class Stages:
    """Timings and peak memory per named stage; ``run(name, fn, ...)`` times one call."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self.peaks = cuda, {}, {}

    def sync(self):
        """Wait for the calling thread's CUDA stream: work run ahead on a stream of its own (frame 0's,
        beside recon) is not waited for by the main thread's stages, nor counted in them."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()

    def run(self, name, fn, *args, **kwargs):
        """A call on another thread than the main one (work done ahead, beside a stage) is booked as
        ``ahead.<name>``, outside the stages that add up to the total, and leaves the peak counter alone;
        its time until ``fn`` returns, before the wait for its GPU work, also as ``ahead.<name>_launch``
        (close to the whole when the thread, not the GPU, sets the pace)."""
        ahead = threading.current_thread() is not threading.main_thread()
        if ahead:
            name = f"ahead.{name}"
        self.sync()
        if self.cuda and not ahead:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if ahead:
            self.times.setdefault(f"{name}_launch", []).append(time.perf_counter() - start)
        self.sync()
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        return out

    def accumulating(self, name: str, fn, when=None):
        """``fn`` timed into ``name`` on every call (for ``when(*args)`` true, if given), without the stage's
        synchronisation and peak reset: for parts inside a stage (``<stage>.<part>_parts``)."""
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if when is None or when(*args):
                    self.times.setdefault(name, []).append(time.perf_counter() - start)
        return wrapper

    def wrap(self, obj, method: str, name: str):
        """Time every call of ``obj.method`` as stage ``name`` (an instance attribute shadows the method)."""
        fn = getattr(obj, method)
        setattr(obj, method, lambda *a, **k: self.run(name, fn, *a, **k))

    def clear(self):
        self.times.clear()
        self.peaks.clear()


def time_recon_parts(stages: Stages) -> None:
    """Time the parts of recon as stages ``recon.*``, on the main thread, by wrapping what it calls:

    ``recon.renderer_setup`` / ``recon.renderer_release`` (the EGL context, its buffers and program),
    ``recon.render_loop`` (time inside
    the frame iterator: mesh, render, antialias, waiting for the read-ahead), ``recon.write`` (handing
    frames to the encoders), ``recon.encode_finish`` (the encoders' flush at the end),
    ``recon.depth_sha1`` (the depth's identity for reuse). The rest of ``recon`` is set-up and publishing.
    Inside the render loop: ``recon.mesh_build`` (launching the DW-Mesh build), ``recon.frame_stage`` /
    ``frame_gl`` / ``frame_antialias`` (the renderer's own split: packing the vertices to the host,
    upload + draw + read-back, silhouettes + antialiasing), ``recon.finish_frame`` (threshold and mask),
    ``recon.read_wait`` (waiting for the decoded source frames and the depth frames, both streams). With
    meshes on a GPU the antialiasing's blend and ``finish_frame`` run on helper threads beside the next
    frame's build and draw (``CUDA_LOOP_OVERLAP``), so the parts then add up to more than the loop.
    """
    import ex4d.io.arrays as arrays
    import ex4d.render.condition as condition
    import ex4d.types as types
    from ex4d.render.rasterizer import MeshRenderer

    accumulate = stages.accumulating

    def timed_items(name, fn):
        """Time each item the iterator ``fn`` returns takes to arrive (as ``name``)."""
        def wrapper(*args, **kwargs):
            items = iter(fn(*args, **kwargs))
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    stages.times.setdefault(name, []).append(time.perf_counter() - start)
                yield item
        return wrapper

    init, render_deferred = MeshRenderer.__init__, MeshRenderer.render_deferred

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.timings = {}  # the renderer's own per-frame split (ms), read after each render

    def timed_render_deferred(self, *args, **kwargs):
        finish = render_deferred(self, *args, **kwargs)
        timings = dict(self.timings)  # this frame's; the next render replaces them
        for key in ("stage_ms", "gl_ms"):
            if key in timings:
                stages.times.setdefault(f"recon.frame_{key[:-3]}_parts", []).append(timings[key] / 1000)

        def timed_finish():
            start = time.perf_counter()
            try:
                return finish()
            finally:  # the part of the antialiasing done at render time, plus the blend (maybe on a helper thread)
                seconds = timings.get("antialias_ms", 0.0) / 1000 + time.perf_counter() - start
                stages.times.setdefault("recon.frame_antialias_parts", []).append(seconds)
        return timed_finish

    import ex4d.mesh.dwmesh as dwmesh

    condition.iter_condition = timed_items("recon.render_loop_parts", condition.iter_condition)
    condition.finish_frame = accumulate("recon.finish_frame_parts", condition.finish_frame)
    dwmesh.build_dw_mesh = accumulate("recon.mesh_build_parts", dwmesh.build_dw_mesh)
    arrays.read_ahead = timed_items("recon.read_wait_parts", arrays.read_ahead)
    MeshRenderer.__init__ = accumulate("recon.renderer_setup_parts", timed_init)
    MeshRenderer.render_deferred = timed_render_deferred
    MeshRenderer.release = accumulate("recon.renderer_release_parts", MeshRenderer.release)
    types.ConditionWriter.write = accumulate("recon.write_parts", types.ConditionWriter.write)
    types.ConditionWriter.__exit__ = accumulate("recon.encode_finish_parts", types.ConditionWriter.__exit__)
    arrays.frames_sha1 = accumulate("recon.depth_sha1_parts", arrays.frames_sha1)


def time_generate_parts(stages: Stages, output_prefix: str) -> None:
    """Time the parts of generate around the sampler as stages ``generate.*``: ``generate.load_condition``
    (reading the colour and mask videos, erosion, scaling), ``generate.prompt_lookup`` (the prompt
    embedding cache), ``generate.first_frame_wait`` / ``generate.condition_wait`` (waiting for frame
    0's work and the condition's encodes run ahead on a helper thread, once the condition is read;
    on that thread, ``ahead.condition_chunk_launch`` and ``ahead.condition_finish_launch`` time its calls
    without waiting for the GPU)
    and ``generate.writer_close`` (closing the final video's writer after the last
    decoded frame: the streamed encode's tail, or the whole encode without streaming). The writer
    of a file whose name starts with ``output_prefix`` is the final video's; recon's are not counted."""
    import ex4d.diffusion.conditioning as conditioning
    import ex4d.pipeline as pipeline
    from ex4d.io.video import VideoWriter

    accumulate = stages.accumulating

    conditioning.load_condition = accumulate("generate.load_condition_parts", conditioning.load_condition)
    pipeline._cached_prompt_embeds = accumulate("generate.prompt_lookup_parts", pipeline._cached_prompt_embeds)
    pipeline._context_computed_ahead = accumulate("generate.first_frame_wait_parts", pipeline._context_computed_ahead)
    pipeline._condition_computed_ahead = accumulate("generate.condition_wait_parts",
                                                    pipeline._condition_computed_ahead)
    # The condition's encodes on the helper thread, timed without waiting for the GPU (so as not to
    # change when the helper queues its work): the time its chunk calls and its finish take to return
    # (launching kernels, and waiting for the GIL beside recon's threads). Near the encodes' GPU time
    # (about 0.7 s for the two), the thread, not the GPU, sets the pace.
    from ex4d.diffusion.pipeline import ConditionEncodeStream

    ConditionEncodeStream._encode_chunk = accumulate("ahead.condition_chunk_launch_parts",
                                                     ConditionEncodeStream._encode_chunk)
    ConditionEncodeStream.finish = accumulate("ahead.condition_finish_launch_parts", ConditionEncodeStream.finish)
    VideoWriter.__exit__ = accumulate("generate.writer_close_parts", VideoWriter.__exit__,
                                      lambda writer, *a: writer.path.name.startswith(output_prefix))


def add_recon_setting_args(parser: argparse.ArgumentParser) -> None:
    """``--x264-lookahead``, ``--condition-lookahead``, ``--loop-torch-threads`` and ``--no-loop-overlap``: the
    encoders' and recon's loop settings, for A/B runs."""
    parser.add_argument("--x264-lookahead", type=int, default=None,
                        help="libx264 rc-lookahead of the final video (default: ex4d.io.video.H264_LOOKAHEAD)")
    parser.add_argument("--condition-lookahead", type=int, default=None,
                        help="libx264 rc-lookahead of recon's condition videos, 0 for preset medium's 40 "
                             "(default: ex4d.io.video.CONDITION_H264_LOOKAHEAD)")
    parser.add_argument("--no-loop-overlap", action="store_true",
                        help="finish each rendered frame in line instead of on a helper thread beside the next "
                             "frame's draw (ex4d.render.condition.CUDA_LOOP_OVERLAP off)")
    parser.add_argument("--loop-finish-threads", type=int, default=None, metavar="N",
                        help="threads that finish rendered frames beside the next frame's draw (default: "
                             "ex4d.render.condition.CUDA_LOOP_FINISH_THREADS)")
    parser.add_argument("--loop-torch-threads", type=int, default=None,
                        help="torch CPU threads in recon's render loop with GPU meshes, 0 for torch's own count "
                             "(default: ex4d.render.condition.CUDA_LOOP_TORCH_THREADS)")


def apply_recon_settings(args) -> dict:
    """Set what :func:`add_recon_setting_args` parsed; returns the settings in force (for the JSON)."""
    import ex4d.io.video as video_io
    import ex4d.render.condition as condition

    if args.x264_lookahead is not None:
        video_io.H264_LOOKAHEAD = args.x264_lookahead
    if args.condition_lookahead is not None:
        video_io.CONDITION_H264_LOOKAHEAD = args.condition_lookahead or None
    if args.loop_torch_threads is not None:
        condition.CUDA_LOOP_TORCH_THREADS = args.loop_torch_threads or None
    if args.no_loop_overlap:
        condition.CUDA_LOOP_OVERLAP = False
    if args.loop_finish_threads is not None:
        condition.CUDA_LOOP_FINISH_THREADS = args.loop_finish_threads
    return {"x264_lookahead": video_io.H264_LOOKAHEAD, "condition_lookahead": video_io.CONDITION_H264_LOOKAHEAD,
            "loop_torch_threads": condition.CUDA_LOOP_TORCH_THREADS, "loop_overlap": condition.CUDA_LOOP_OVERLAP,
            "loop_finish_threads": condition.CUDA_LOOP_FINISH_THREADS}


def stage_medians(times: dict, runs: int) -> dict:
    """Median seconds per stage over ``runs`` runs. A stage timed once per run: the median of its times;
    a ``*_parts`` list (one entry per call) under its name without ``_parts``: the median of its per-run
    sums, the list split into ``runs`` equal runs (each run makes the same calls)."""
    out = {name: statistics.median(values) for name, values in times.items() if not name.endswith("_parts")}
    for name, values in times.items():
        if name.endswith("_parts") and runs and len(values) % runs == 0:
            per = len(values) // runs
            out[name[:-len("_parts")]] = statistics.median(sum(values[i * per:(i + 1) * per]) for i in range(runs))
    return out


def build_depth(tiny: bool, device: str, compile_: bool = False, kind: str = "depthcrafter"):
    """A depth estimator of the real classes with random weights, resident: (estimator, settings).

    ``depthcrafter`` (fp16 on CUDA) with the settings of ``ex4d depth --compile --fp16-encode`` (or
    ``--fast-kernels --fp16-encode``); ``vda``: Video Depth Anything Small (``ex4d depth --depth vda``,
    fp16 autocast on CUDA), built as bench/bench_vda.py builds it."""
    if kind == "vda":
        from bench_vda import build_model

        from ex4d.depth.vda import VideoDepthAnything

        model = build_model(torch.device(device), tiny)
        return VideoDepthAnything(model, device=device, input_size=42 if tiny else 518), {"estimator": "vda"}
    from bench_depth import build_models

    from ex4d.depth.depthcrafter import (
        COMPILE_PRESET,
        FAST_KERNELS,
        DepthCrafter,
        DepthCrafterPipeline,
        DepthCrafterSettings,
    )

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    settings = dict(COMPILE_PRESET if compile_ else FAST_KERNELS, encode_dtype="model") if cuda else {}
    unet, vae, clip = build_models(torch.device(device), dtype, tiny=tiny)
    pipe = DepthCrafterPipeline(unet, vae, clip, device=torch.device(device), dtype=dtype,
                                settings=DepthCrafterSettings(**settings))
    return DepthCrafter(pipe), settings


def generate_options(preset: str, args, device: str):
    """ex4d.pipeline.GenerateOptions for the preset (the sampler preset if that option exists)."""
    import dataclasses

    from ex4d.pipeline import GenerateOptions

    spec = PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(GenerateOptions)}
    kwargs = dict(device=device, compile=device == "cuda" and not args.no_compile, fp8=spec["fp8"],
                  low_vram=spec["low_vram"], vram_budget=args.vram_budget if spec["low_vram"] else None,
                  size=f"{args.size}x{args.size}", attention=args.attention)
    if "preset" in fields:
        kwargs["preset"] = spec["preset"]
    else:
        kwargs["steps"], kwargs["cfg"] = SAMPLER[spec["preset"]]
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.guidance is not None:
        kwargs["cfg"] = args.guidance
    if "prompt_cache" in fields:
        kwargs["prompt_cache"] = "off"  # the random T5 runs: its time is part of the measurement
    return GenerateOptions(**kwargs).validate()


def time_final_encodes(generated: Path, source: Path, repeats: int = 3) -> dict:
    """Median seconds of ``write_video`` (the final encode of ``run_generate``) on two clips of one shape.

    Random weights generate noise-like frames, which x264 (CRF 16) takes several times longer to
    encode than a natural video; ``generate_io`` pays that. So the same encode is timed on the frames
    of ``generated`` (a run's output, decoded) and on the source clip's frames, cut to the same count
    and size. ``total_s_median_with_source_like_final_encode`` swaps the one for the other: derived,
    not a measured run.
    """
    from ex4d.io.video import read_video, resize_frames, write_video

    frames, fps = read_video(generated)
    natural, _ = read_video(source, len(frames))
    natural = resize_frames(natural, frames.shape[1:3])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, clip in (("generated_frames", frames), ("source_clip_frames", natural)):
            times = []
            for r in range(repeats):
                start = time.perf_counter()
                write_video(Path(tmp) / f"{name}{r}.mp4", clip, fps=fps)
                times.append(time.perf_counter() - start)
            out[name] = round(statistics.median(times), 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=list(PRESETS), help="default full")
    parser.add_argument("--runs", type=int, default=3, help="timed whole runs after the warm-up (default 3)")
    parser.add_argument("--frames", type=int, default=None, help="default 49 (tiny: 9)")
    parser.add_argument("--size", type=int, default=None, help="square side, default 512 (tiny: 64)")
    parser.add_argument("--cam", default="90", help="camera path (default 90)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps (default: preset's)")
    parser.add_argument("--guidance", type=float, default=None, help="override the preset's guidance (default: "
                        "preset's)")
    parser.add_argument("--vram-budget", type=float, default=11.5, metavar="GIB",
                        help="lowvram-fp8: the generation's GPU budget (default 11.5: DepthCrafter's 4.1 GiB of "
                             "fp16 weights stay resident beside it, for a 16 GiB total)")
    parser.add_argument("--depth", default="depthcrafter", choices=["depthcrafter", "vda"],
                        help="depth estimator (default depthcrafter, as in the paper; vda: Video Depth Anything Small)")
    parser.add_argument("--cprofile", default=None, metavar="FILE",
                        help="after the timed runs, one more run under cProfile, its stats saved to FILE "
                             "(pstats; where the seconds outside the GPU kernels go); not in the medians")
    parser.add_argument("--depth-compile", action="store_true",
                        help="torch.compile DepthCrafter too (ex4d depth --compile; minutes of compilation in "
                             "the warm-up; default: its fast kernels without compile)")
    parser.add_argument("--no-compile", action="store_true", help="eager DiT (default: compiled on CUDA)")
    accumulation = parser.add_mutually_exclusive_group()
    accumulation.add_argument("--fp8-fast-accum", action="store_true",
                              help="fp8 GEMMs with cuBLASLt fast accumulation (ex4d.diffusion.fp8's default; kept "
                                   "for command lines that name it)")
    accumulation.add_argument("--fp8-exact-accum", action="store_true",
                              help="fp8 GEMMs without fast accumulation (default: ex4d.diffusion.fp8's default, fast)")
    parser.add_argument("--fp8-bias-epilogue", action="store_true",
                        help="fp8 GEMMs add the bias in their epilogue (default: ex4d.diffusion.fp8's default)")
    parser.add_argument("--full-gpu-total-s", type=float, default=None, metavar="S",
                        help="lowvram-fp8: the full-fp8 preset's total_s_median from the same machine; adds the "
                             "ratio and checks the <= 1.2x goal (default: not compared)")
    parser.add_argument("--attention", default=None, metavar="NAME",
                        help="the DiT's attention kernel, as ex4d generate --attention (default: native; fp8: "
                             "cuDNN's fp8 self-attention)")
    parser.add_argument("--vae-contiguous", action="store_true",
                        help="keep the VAE's convolution weights contiguous (ex4d's default is channels_last_3d on CUDA)")
    parser.add_argument("--no-vae-norm-compile", action="store_true",
                        help="leave the VAE's RMS norms eager (ex4d compiles them with --compile on CUDA)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark on (cuDNN times its convolution algorithms once per "
                             "shape: the VAE's and DepthCrafter's); default off, as in ex4d")
    add_recon_setting_args(parser)
    parser.add_argument("--no-streamed-decode", action="store_true",
                        help="decode the whole video, then encode it (ex4d encodes while the VAE decodes)")
    parser.add_argument("--no-first-frame-ahead", action="store_true",
                        help="compute CLIP and the first-frame latent in the sampler call, not beside reading the "
                             "condition (ex4d.pipeline.FIRST_FRAME_AHEAD off)")
    parser.add_argument("--no-recon-first-frame", action="store_true",
                        help="start frame 0's work when generation starts, not during recon from the colour "
                             "encoder's frame 0 (ex4d.pipeline.start_ahead_of_recon, as batch jobs chain it)")
    parser.add_argument("--no-condition-ahead", action="store_true",
                        help="encode the condition in the sampler call, not during recon frame by frame "
                             "(ex4d.pipeline.CONDITION_AHEAD off)")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="S",
                        help="Python's thread switch interval for the whole benchmark (sys.setswitchinterval; "
                             "default: Python's 0.005 s), to see whether the helper thread beside recon waits "
                             "for the GIL")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--workdir", default=None, help="where the runs write (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        if args.switch_interval <= 0:
            parser.error("--switch-interval must be a positive number of seconds")
        sys.setswitchinterval(args.switch_interval)
    if args.cprofile and Path(args.cprofile).exists():  # now, not after minutes of GPU time
        parser.error(f"--cprofile {args.cprofile} exists; give a new file (the profile never replaces one)")

    from diffusers.utils import logging as dlogging

    from ex4d.diffusion.parallel import num_video_tokens
    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline
    from ex4d.io.video import probe_video
    import ex4d.pipeline as pipeline
    from ex4d.pipeline import ReconOptions, estimate_depth, load_clip, run_generate, run_recon

    pipeline.FIRST_FRAME_AHEAD = pipeline.FIRST_FRAME_AHEAD and not args.no_first_frame_ahead
    pipeline.CONDITION_AHEAD = pipeline.CONDITION_AHEAD and not args.no_condition_ahead
    dlogging.set_verbosity_error()
    from ex4d.diffusion.fp8 import Float8Linear
    from ex4d.diffusion.pipeline import EX4DPipeline

    recon_settings = apply_recon_settings(args)
    if args.no_streamed_decode:
        EX4DPipeline.decode_latents_streamed = EX4DPipeline.decode_latents_then_hand_over

    Float8Linear.FAST_ACCUM = (Float8Linear.FAST_ACCUM or args.fp8_fast_accum) and not args.fp8_exact_accum
    Float8Linear.BIAS_IN_GEMM = Float8Linear.BIAS_IN_GEMM or args.fp8_bias_epilogue
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    args.frames = args.frames or (9 if args.tiny else 49)
    args.size = args.size or (64 if args.tiny else 512)
    options = generate_options(args.preset, args, device)
    dtype = torch.bfloat16 if cuda else torch.float32

    t0 = time.perf_counter()
    torch.manual_seed(0)
    comps = build_tiny() if args.tiny else build_full(device, dtype)
    depth_estimator, depth_settings = build_depth(args.tiny, device, compile_=args.depth_compile, kind=args.depth)
    build_s = time.perf_counter() - t0
    note(f"built models in {build_s:.1f}s")

    # The same PerformanceOptions that ex4d.pipeline.load_generator derives from these options.
    perf = PerformanceOptions(merge_lora=options.merge_lora, attention=options.attention, compile=options.compile,
                              batch_cfg=options.batch_cfg, low_vram=options.low_vram, cpu_offload=options.cpu_offload,
                              fp8=options.fp8, vram_budget_gib=options.vram_budget, dtype=dtype,
                              low_vram_tokens=num_video_tokens(args.frames, args.size, args.size),
                              vae_channels_last=not args.vae_contiguous,
                              compile_vae_norms=not args.no_vae_norm_compile)
    if args.tiny and (options.fp8 or options.attention == "fp8"):
        perf.fp8_emulate = True  # the CPU has no fp8 tensor cores; the maths is emulated
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    t0 = time.perf_counter()
    pipe = build_pipeline(comps, None, perf, device)
    del comps
    setup_s = time.perf_counter() - t0
    resident = getattr(getattr(pipe.transformer, "_ex4d_streamer", None), "resident", None)
    note(f"generation pipeline set up in {setup_s:.1f}s" + (f" ({resident} DiT blocks resident)" if resident else ""))
    pipe.set_progress_bar_config(disable=True)
    cache = {"generate_pipe": pipe, "generate_key": options.pipeline_key()}

    stages = Stages(cuda)
    for method, name in (("encode_prompt", "text_encoder"), ("encode_image", "image_encoder"),
                         ("prepare_condition", "vae_encode"), ("_decode_video", "vae_decode"),
                         ("first_frame_context", "first_frame_context")):
        stages.wrap(pipe, method, name)
    time_recon_parts(stages)
    time_generate_parts(stages, "ex4d_")
    pipe_class = type(pipe)
    call = pipe_class.__call__
    pipe_class.__call__ = lambda self, *a, **k: stages.run("sampler_call", call, self, *a, **k)

    from peak_memory import make_clip

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ex4d_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    video = make_clip(work, args.frames, args.size)

    def whole(run_dir: Path) -> float:
        stages.sync()
        start = time.perf_counter()
        clip = stages.run("read_clip", load_clip, video, num_frames=args.frames)
        depth = stages.run("depth", estimate_depth, clip, args.depth, out_dir=run_dir, estimator=depth_estimator,
                           reuse=False)
        note(f"  depth {stages.times['depth'][-1]:.1f}s")
        # As batch jobs chain them: frame 0's work starts from the colour encoder's frame 0 during recon.
        ahead = None if args.no_recon_first_frame else pipeline.start_ahead_of_recon(options, cache, args.frames)
        try:
            recon = stages.run("recon", run_recon, clip, depth, run_dir, ReconOptions(cam=args.cam, device=device),
                               condition_sink=ahead.sink if ahead is not None else None)
            note(f"  recon {stages.times['recon'][-1]:.1f}s")
            out = stages.run("generate", run_generate, recon["color"], recon.get("mask"),
                             run_dir / f"ex4d_{args.cam}.mp4", options, cache=cache, show_progress=False, ahead=ahead)
        finally:
            if ahead is not None:
                ahead.close()
        note(f"  generate {stages.times['generate'][-1]:.1f}s")
        stages.sync()
        total = time.perf_counter() - start
        count, size, _ = probe_video(out, args.frames)
        assert count == args.frames and tuple(size) == (args.size, args.size), (count, size)
        return total

    t0 = time.perf_counter()
    warm_s = whole(work / "warmup")
    note(f"warm-up run (compiles) {warm_s:.1f}s")
    stages.clear()
    totals = []
    for i in range(args.runs):
        totals.append(whole(work / f"run{i}"))
        note(f"run {i + 1}: {totals[-1]:.2f}s")

    med = stage_medians(stages.times, args.runs)
    recon_parts = {k.split(".", 1)[1] + "_s": round(v, 3) for k, v in med.items() if k.startswith("recon.")}
    generate_parts = {k.split(".", 1)[1] + "_s": round(v, 3) for k, v in med.items() if k.startswith("generate.")}
    # CLIP and the first-frame latent computed ahead, beside reading the condition (warm runs): not in the sum
    generate_parts.update({f"ahead_{k.split('.', 1)[1]}_s": round(v, 3) for k, v in med.items()
                           if k.startswith("ahead.")})
    final_encode = time_final_encodes(work / f"run{args.runs - 1}" / f"ex4d_{args.cam}.mp4", video)
    note(f"final encode: {final_encode}")
    if args.cprofile:
        import cProfile

        from ex4d.io.files import atomic_path

        profiler = cProfile.Profile()
        profiler.runcall(whole, work / "profiled")
        with atomic_path(args.cprofile) as tmp:  # whole or nothing
            profiler.dump_stats(str(tmp))
        note(f"cProfile stats of one more run: {args.cprofile}")
    encoders = sum(med.get(k, 0.0) for k in ("text_encoder", "image_encoder"))
    denoise = med["sampler_call"] - encoders - med.get("vae_encode", 0.0) - med.get("vae_decode", 0.0)
    stage_s = {"read_clip": med["read_clip"], "depth": med["depth"], "recon": med["recon"],
               "text_and_image_encoders": encoders, "vae_encode": med.get("vae_encode", 0.0), "denoise": denoise,
               "vae_decode": med.get("vae_decode", 0.0),
               "generate_io": med["generate"] - med["sampler_call"]}  # read colour/mask, write mp4 + record
    import diffusers

    total_med = statistics.median(totals)
    result = dict(
        bench="e2e", preset=args.preset, commit=git_commit(), device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__, diffusers=diffusers.__version__,
        shape={"frames": args.frames, "height": args.size, "width": args.size}, cam=args.cam,
        steps=options.steps, guidance=options.cfg, fp8=options.fp8, fp8_fast_accum=Float8Linear.FAST_ACCUM,
        fp8_bias_epilogue=Float8Linear.BIAS_IN_GEMM, low_vram=options.low_vram,
        vram_budget_gib=options.vram_budget, compile=options.compile, resident_dit_blocks=resident,
        depth=args.depth, depth_settings=depth_settings, attention=options.attention or "native",
        cudnn_benchmark=args.cudnn_benchmark, vae_channels_last=not args.vae_contiguous,
        compile_vae_norms=not args.no_vae_norm_compile, **recon_settings, streamed_decode=not args.no_streamed_decode,
        first_frame_ahead=pipeline.FIRST_FRAME_AHEAD,
        recon_first_frame=pipeline.FIRST_FRAME_AHEAD and not args.no_recon_first_frame,
        condition_ahead=pipeline.FIRST_FRAME_AHEAD and not args.no_recon_first_frame and pipeline.CONDITION_AHEAD,
        switch_interval_s=sys.getswitchinterval(),
        runs=args.runs,
        total_s_median=round(total_med, 3), total_s_runs=[round(t, 3) for t in totals],
        stages_s_median={k: round(v, 3) for k, v in stage_s.items()},
        recon_parts_s_median=recon_parts,
        generate_parts_s_median=generate_parts,
        denoise_step_s=round(denoise / options.steps, 4),
        peak_gib=round(max(stages.peaks.values()), 3) if cuda else None,
        stage_peak_gib={k: round(v, 2) for k, v in stages.peaks.items()} if cuda else None,
        warm_up_s=round(warm_s, 2), build_s=round(build_s, 2), setup_s=round(setup_s, 2),
        cold_load_from_disk="not measured (random weights are built on the GPU, not read from files)",
        reference_sum_s=REFERENCE_SUM_S,
        final_encode_s_median=final_encode,
        total_s_median_with_source_like_final_encode=None if not args.no_streamed_decode else round(
            total_med - final_encode["generated_frames"] + final_encode["source_clip_frames"], 3))
    goal = GOALS.get(args.preset.replace("-fp8", "") if args.preset != "lowvram-fp8" else args.preset)
    if goal and cuda and args.size == 512 and args.frames == 49:
        if args.preset == "lowvram-fp8" and args.full_gpu_total_s:
            goal = {**goal, "ratio_to_full_gpu_fp8": 1.2}
            result["ratio_to_full_gpu_fp8"] = round(total_med / args.full_gpu_total_s, 3)
        measured = {"total_s": total_med, "peak_gib": max(stages.peaks.values()),  # unrounded
                    "ratio_to_full_gpu_fp8": result.get("ratio_to_full_gpu_fp8")}
        result["goal"] = goal
        result["goal_met"] = all(measured[k] is not None and measured[k] <= v for k, v in goal.items())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
