"""The GPU benchmarks' own CPU modes: each script runs end to end and prints the JSON its docs describe.

Device time is scarce, so a benchmark script that breaks must fail here, on the CPU, and not after a
GPU machine has started. These runs check the scripts, not speed: the models are the tiny ones.
"""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 300) -> dict:
    """Run ``bench/<script>`` with ``args``; return the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1])


def test_bench_e2e_tiny_with_vda_depth_and_a_profile(tmp_path):
    profile = tmp_path / "e2e.prof"
    result = run_bench("bench_e2e.py", "--tiny", "--preset", "fast-fp8", "--depth", "vda", "--attention", "fp8",
                       "--runs", "1", "--cprofile", str(profile), "--workdir", str(tmp_path / "work"))
    assert result["bench"] == "e2e" and result["preset"] == "fast-fp8" and result["depth"] == "vda"
    assert result["attention"] == "fp8"
    assert result["steps"] == 4 and result["guidance"] == 1.0 and result["fp8"] is True
    stages = result["stages_s_median"]
    assert set(stages) == {"read_clip", "depth", "recon", "text_and_image_encoders", "vae_encode", "denoise",
                           "vae_decode", "generate_io"}
    assert all(value >= 0 for value in stages.values()) and result["total_s_median"] > 0
    assert len(result["total_s_runs"]) == 1
    encodes = result["final_encode_s_median"]
    assert set(encodes) == {"generated_frames", "source_clip_frames"} and all(v > 0 for v in encodes.values())
    assert result["streamed_decode"] is True  # the encode overlaps the decode: no swapped total
    assert result["first_frame_ahead"] is True  # the setting (on the CPU nothing is computed ahead)
    assert result["total_s_median_with_source_like_final_encode"] is None
    parts = result["recon_parts_s_median"]
    assert {"renderer_setup_s", "render_loop_s", "mesh_build_s", "frame_gl_s", "frame_antialias_s", "read_wait_s",
            "write_s", "encode_finish_s", "depth_sha1_s"} <= set(parts)
    assert parts["render_loop_s"] > 0 and parts["render_loop_s"] <= stages["recon"] + 0.002
    around = result["generate_parts_s_median"]  # the parts of generate_io: each timed once per run
    assert set(around) == {"load_condition_s", "prompt_lookup_s", "first_frame_wait_s", "condition_wait_s",
                           "writer_close_s"}
    assert around["load_condition_s"] > 0 and around["writer_close_s"] > 0
    assert sum(around.values()) <= stages["generate_io"] + 0.003
    # the profiled run is an extra run: its folder exists, and its stats name the pipeline's stages
    assert (tmp_path / "work" / "profiled" / "ex4d_90.mp4").is_file()
    functions = {name for (_, _, name) in pstats.Stats(str(profile)).stats}
    assert {"run_recon", "run_generate", "estimate_depth"} <= functions


def test_bench_e2e_tiny_unstreamed_with_encoder_and_thread_settings(tmp_path):
    result = run_bench("bench_e2e.py", "--tiny", "--preset", "fast", "--runs", "1", "--no-streamed-decode",
                       "--no-first-frame-ahead",
                       "--x264-lookahead", "10", "--condition-lookahead", "0", "--loop-torch-threads", "1",
                       "--workdir", str(tmp_path))
    assert result["streamed_decode"] is False and result["x264_lookahead"] == 10
    assert result["first_frame_ahead"] is False
    assert result["condition_lookahead"] is None  # 0: preset medium's own
    assert result["loop_torch_threads"] == 1
    assert result["stages_s_median"]["vae_decode"] > 0
    # unstreamed, closing the final video's writer is its whole encode (the recon writers are not counted)
    assert 0 < result["generate_parts_s_median"]["writer_close_s"] <= result["stages_s_median"]["generate_io"]
    encodes = result["final_encode_s_median"]
    swapped = result["total_s_median"] - encodes["generated_frames"] + encodes["source_clip_frames"]
    assert abs(result["total_s_median_with_source_like_final_encode"] - swapped) <= 0.002  # rounding only


def test_bench_vda_tiny_reports_every_case():
    result = run_bench("bench_vda.py", "--tiny", "--repeats", "1")
    assert result["bench"] == "vda" and result["device"] == "cpu"
    cases = {(r["case"], r["mode"]) for r in result["results"]}
    assert cases == {(case, mode) for case in ("49@512x512", "49@576x1024", "1000@512x512")
                     for mode in ("memory", "stream")}
    assert not result["skipped"]
    assert all(r["total_s"] > 0 and r["frames"] > 0 for r in result["results"])


def test_bench_app_preview_on_the_cpu():
    result = run_bench("bench_app_preview.py", "--device", "cpu", "--frames", "9", "--size", "64", "--runs", "1")
    assert result["bench"] == "app_preview" and result["frames"] == 9 and result["size"] == [64, 64]
    assert len(result["runs_s"]) == 1 and result["median_s"] > 0
    assert {"color_path.mp4", "mask_path.mkv", "camera_path.npz", "settings.json"} <= set(result["files"])
    assert 0.0 < result["min_visible_fraction"] <= 1.0


def test_bench_fp8_tiny_emulated():
    result = run_bench("bench_fp8.py", "--tiny")
    assert result["bench"] == "bench_fp8" and result["device"] == "cpu" and result["fp8_layers"] > 0
    deviation = result["fp8_exact_vs_bf16"]
    # emulated fp8 really rounds (not zero) and stays close to the unquantised model
    assert 0.0 < deviation["conditional"]["rel_l2"] < 0.1 and 0.0 < deviation["guided"]["rel_l2"] < 0.2
    assert result["fp8_exact_step_s"] > 0


def test_bench_e2e_never_replaces_an_existing_profile_file(tmp_path):
    existing = tmp_path / "mine.prof"
    existing.write_text("not ex4d's")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--tiny", "--cprofile", str(existing)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exists; give a new file" in proc.stderr
    assert existing.read_text() == "not ex4d's"


def test_bench_condition_io_small():
    result = run_bench("bench_condition_io.py", "--frames", "5", "--size", "64", "--repeats", "1")
    assert result["bench"] == "condition_io" and result["frames"] == 5 and result["size"] == [64, 64]
    for key in ("load_condition_s_median", "write_video_s_median", "write_video_noise_s_median"):
        assert result[key] > 0, key


def test_bench_recon_stage_on_the_cpu():
    result = run_bench("bench_recon_stage.py", "--frames", "9", "--size", "64", "--runs", "1",
                       "--x264-lookahead", "10", "--condition-lookahead", "5", "--loop-torch-threads", "2",
                       "--no-loop-overlap", "--loop-finish-threads", "2")
    assert result["bench"] == "recon_stage" and result["device"] == "cpu" and len(result["recon_s_runs"]) == 1
    assert result["x264_lookahead"] == 10 and result["loop_torch_threads"] == 2
    assert result["loop_finish_threads"] == 2
    assert result["condition_lookahead"] == 5 and result["loop_overlap"] is False
    assert "llvmpipe" in result["renderer"] or "EGL" in result["renderer"]
    parts = result["parts_s_median"]
    assert 0 < parts["render_loop_s"] <= result["recon_s_median"]
    assert parts["frame_gl_s"] > 0 and parts["mesh_build_s"] > 0 and parts["encode_finish_s"] > 0


def test_bench_x264_streamed_with_lookaheads():
    result = run_bench("bench_x264.py", "--threads", "4", "--lookahead", "40,10", "--content", "render",
                       "--stream-over", "0.2", "--repeats", "1")
    cases = result["cases"]
    assert set(cases) == {"render_40_4", "render_10_4"}
    assert all(c["tail_s"] >= 0 and c["one_s"] > 0 and c["psnr_db"] > 30 for c in cases.values())


def test_bench_vae_tiny_with_compiled_norms():
    result = run_bench("bench_vae.py", "--tiny", "--repeats", "1", "--no-batch",
                       "--variants", "default,channels_last+compiled_norms", timeout=600)
    variants = result["variants"]
    assert set(variants) == {"default", "channels_last+compiled_norms"}
    assert variants["default"]["reference_for_differences"] is True
    compiled = variants["channels_last+compiled_norms"]
    assert compiled["encode_s"] > 0 and compiled["decode_s"] > 0
    assert compiled["encode_max_abs_vs_default"] < 1e-4 and compiled["decode_max_abs_vs_default"] < 1e-4  # fp32
