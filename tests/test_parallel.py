"""Multi-process generation on CPU (gloo): Ulysses and CFG-parallel match one process.

Two spawned processes stand in for two GPUs. A tiny random I2V ``WanTransformer3DModel`` runs a
short guided Euler loop (the sampler's shape: CFG combine, then x += v * dsigma) in each layout;
the final latents must equal the single-process ones.
"""

import gc
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ex4d.commands import torchrun as torchrun_cli
from ex4d.diffusion import parallel as par
from ex4d.errors import UserError

SIGMAS = [1.0, 0.7, 0.3, 0.0]
GUIDANCE = 5.0


def tiny_transformer(dtype=torch.float32):
    """A seeded tiny I2V WanTransformer3DModel (2 layers, 2 heads of 12, image cross-attention).

    In bf16 the modules diffusers keeps in fp32 (time embedder, norms, ...) stay fp32, as
    ``from_pretrained(torch_dtype=bf16)`` leaves them."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        image_dim=24, added_kv_proj_dim=24, rope_max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random and non-zero (zero-init layers would hide mistakes)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    if dtype != torch.float32:
        keep = tuple(model._keep_in_fp32_modules)
        for name, module in model.named_modules():
            if name and not any(part in keep for part in name.split(".")) and not list(module.children()):
                module.to(dtype)
    return model.eval()


def inputs():
    """Latent noise (1,16,3,8,8) + y (1,20,3,8,8) -> 3*4*4 = 48 tokens; text 10 tokens, image 5."""
    g = torch.Generator().manual_seed(1)
    return dict(noise=torch.randn(1, 16, 3, 8, 8, generator=g), y=torch.randn(1, 20, 3, 8, 8, generator=g),
                pos=torch.randn(1, 10, 32, generator=g), neg=torch.randn(1, 7, 32, generator=g),
                image=torch.randn(1, 5, 24, generator=g))


def sample(model, ctx=None, dtype=torch.float32):
    """A 3-step guided flow-matching Euler loop through :func:`par.guided_velocity`.

    Latents stay fp32 (as in the reference sampler); the model sees ``dtype`` inputs."""
    data = {k: v if k == "noise" else v.to(dtype) for k, v in inputs().items()}
    x = data["noise"].clone()
    for sigma, sigma_next in zip(SIGMAS[:-1], SIGMAS[1:]):
        t = torch.tensor([1000.0 * sigma])

        def predict(branch):
            text = data["pos"] if branch == "positive" else data["neg"]
            return model(torch.cat([x.to(dtype), data["y"]], 1), t, text,
                         encoder_hidden_states_image=data["image"], return_dict=False)[0].float()

        with torch.no_grad():
            v = par.guided_velocity(predict, GUIDANCE, ctx)
        x = x + v * (sigma_next - sigma)
    return x


def _worker(rank, world_size, port, mode, out_dir, dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = par.init_parallel(mode, guidance_scale=GUIDANCE, backend="gloo")
    try:
        model = tiny_transformer(dtype)
        par.enable_ulysses(model, ctx, num_tokens=48)
        result = sample(model, ctx, dtype)
        torch.save({"x": result, "env": {k: os.environ.get(k) for k in par.SAFE_COLLECTIVE_ENV},
                    "layout": (ctx.mode, ctx.cfg_degree, ctx.ulysses_degree, ctx.cfg_rank)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        par.shutdown(ctx)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_and_join(procs, timeout=300):
    """Start the rank processes, wait for them, kill any still running; returns their exit codes.

    A forked child inherits the parent's uncollected garbage, and collecting it there can hang: a
    PyAV reformatter left in a reference cycle by an earlier test frees its swscale context, which
    joins slice threads that exist only in the parent (seen as a hang in peft's adapter injection,
    where the child's garbage collector ran). So the parent collects before forking. A rank left
    running would also keep pytest from exiting (multiprocessing joins its children at exit).
    """
    gc.collect()
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0.1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def _collect_garbage():
    gc.collect()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_ranks_survive_the_parents_video_garbage(tmp_path):
    """start_and_join collects before forking: a forked child that collects a PyAV frame left in a
    reference cycle (converted to RGB, so it holds a threaded swscale context) would hang for good."""
    from ex4d.io.video import _decoded, write_video

    write_video(tmp_path / "clip.mp4", np.zeros((2, 512, 512, 3), np.uint8), 10)
    enabled = gc.isenabled()
    gc.disable()  # keep the cycle for the fork, whatever the collector's thresholds
    try:
        frames = _decoded(tmp_path / "clip.mp4", None, convert=False)
        _, frame = next(frames)
        frame.to_ndarray(format="rgb24")
        cycle = [frame, frames]
        cycle.append(cycle)
        del cycle, frame, frames
        codes = start_and_join([mp.get_context("fork").Process(target=_collect_garbage)], timeout=60)
    finally:
        if enabled:
            gc.enable()
    assert codes == [0]


def run_ranks(world_size, mode, tmp_path, dtype=torch.float32, target=None):
    # fork: the children inherit the imported modules (spawn would re-import torch and diffusers in
    # each, ~20 s on 2 cores). No process group exists in the parent, and each child uses 1 thread.
    spawn = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    port = _free_port()
    if target is None:
        target, extra = _worker, (dtype,)
    else:
        extra = ()
    procs = [spawn.Process(target=target, args=(r, world_size, port, mode, str(tmp_path), *extra))
             for r in range(world_size)]
    codes = start_and_join(procs)
    assert codes == [0] * world_size, f"a rank failed: exit codes {codes}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order as the 1-thread ranks
    try:
        return sample(tiny_transformer())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode, layout", [("ulysses", ("ulysses", 1, 2)), ("cfg", ("cfg", 2, 1))])
def test_two_processes_match_one(mode, layout, single_process, tmp_path):
    results = run_ranks(2, mode, tmp_path)
    assert [r["layout"][:3] for r in results] == [layout] * 2
    if mode == "cfg":
        assert [r["layout"][3] for r in results] == [0, 1]  # one guidance branch per rank
    for r in results:
        assert r["env"] == par.SAFE_COLLECTIVE_ENV  # multicast off in every rank's environment
        torch.testing.assert_close(r["x"], single_process, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0]["x"], results[1]["x"])  # ranks stay in lock-step
    assert single_process.abs().max() > 0.1  # the comparison is not between zeros


def test_ulysses_bf16(tmp_path):
    """bf16 weights and activations (fp32 latents), as on the GPU: all-to-all moves bf16 tensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = sample(tiny_transformer(torch.bfloat16), dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    results = run_ranks(2, "ulysses", tmp_path, torch.bfloat16)
    for r in results:
        assert r["x"].dtype == torch.float32
        torch.testing.assert_close(r["x"], reference, rtol=2e-2, atol=2e-2)  # bf16 tolerance


def test_cfg_times_ulysses_on_four_processes(single_process, tmp_path):
    results = run_ranks(4, "cfg-ulysses", tmp_path)
    assert sorted(r["layout"][3] for r in results) == [0, 0, 1, 1]
    for r in results:
        assert r["layout"][:3] == ("cfg-ulysses", 2, 2)
        torch.testing.assert_close(r["x"], single_process, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The real EX4DPipeline (tiny random components) through parallelize_pipeline
# ---------------------------------------------------------------------------------------------

def tiny_pipeline(device="cpu"):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_wan import make_tiny_components

    from ex4d.diffusion.performance import PerformanceOptions
    from ex4d.diffusion.pipeline import build_pipeline

    pipe = build_pipeline(make_tiny_components(0), None, PerformanceOptions(dtype=torch.float32), device)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a non-trivial camera encoder (its last layer is zero-initialised)
        for p in pipe.camera_encoder.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs():
    """A 5-frame 32x32 condition: latents (1,16,2,4,4) -> 8 tokens, split 4 + 4 by Ulysses."""
    from ex4d.diffusion.conditioning import scale_condition

    g = torch.Generator().manual_seed(2)
    color = torch.rand(5, 32, 32, 3, generator=g)
    mask = torch.rand(5, 32, 32, generator=g) > 0.3
    mask[0] = True
    return scale_condition(color, mask)


def run_pipeline(pipe, batch_cfg=False):
    cond, mask = pipeline_inputs()
    return pipe(cond, mask, num_inference_steps=2, guidance_scale=GUIDANCE, batch_cfg=batch_cfg,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def _pipeline_worker(rank, world_size, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = par.init_parallel(mode, guidance_scale=GUIDANCE, backend="gloo")
    try:
        pipe = par.parallelize_pipeline(tiny_pipeline(), ctx, num_tokens=8)
        split = pipe.transformer._parallel_config is not None  # Ulysses hooks installed
        torch.save({"x": run_pipeline(pipe), "split": split,
                    "layout": (ctx.mode, ctx.cfg_degree, ctx.ulysses_degree, ctx.cfg_rank)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        par.shutdown(ctx)


@pytest.fixture(scope="module")
def single_process_pipeline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = tiny_pipeline()
        return run_pipeline(pipe, batch_cfg=False), run_pipeline(pipe, batch_cfg=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["ulysses", "cfg"])
def test_pipeline_two_processes_match_one(mode, single_process_pipeline, tmp_path):
    sequential, batched = single_process_pipeline
    results = run_ranks(2, mode, tmp_path, target=_pipeline_worker)
    assert [r["layout"][0] for r in results] == [mode, mode]
    assert [r["split"] for r in results] == [mode == "ulysses"] * 2
    for r in results:
        torch.testing.assert_close(r["x"], sequential, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["x"], batched, rtol=1e-4, atol=1e-4)  # batched CFG: other GEMM shapes
    assert sequential.abs().max() > 0.1


def _cli_worker(rank, world_size, port, mode, out_dir, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = torchrun_cli.main([*argv, "--parallel", mode])
    torch.save({"code": code}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_torchrun_entry_point_writes_the_same_video(tmp_path, monkeypatch):
    """``-m ex4d.commands.torchrun`` (what torchrun starts) on tiny weights on disk == ``ex4d generate``."""
    import sys

    import numpy as np

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_wan import write_tiny_ex4d_ckpt, write_tiny_original_layout

    from ex4d.cli import main as cli_main
    from ex4d.diffusion.weights import models_dir as md
    from ex4d.io.video import read_video, write_video

    models = tmp_path / "models"
    write_tiny_original_layout(models / md.WAN_REPO)
    write_tiny_ex4d_ckpt(models / md.EX4D_REPO / md.ADAPTER_CKPT)
    rng = np.random.default_rng(0)
    color = (rng.random((5, 32, 32, 3)) * 255).astype(np.uint8)
    mask = np.full((5, 32, 32), 255, np.uint8)
    mask[1:, :, 20:] = 0
    write_video(tmp_path / "color_30.mp4", color, 10)
    write_video(tmp_path / "mask_30.mkv", mask, 10, codec="ffv1")
    common = ["--color", str(tmp_path / "color_30.mp4"), "--models-dir", str(models), "--size", "32x32",
              "--steps", "2", "--device", "cpu", "--no-batch-cfg"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["generate", *common, "-o", str(tmp_path / "one.mp4")]) == 0
    finally:
        torch.set_num_threads(threads)
    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    spawn = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    port = _free_port()
    argv = [*common, "-o", str(tmp_path / "two.mp4")]
    procs = [spawn.Process(target=_cli_worker, args=(r, 2, port, "cfg", str(out_dir), argv)) for r in range(2)]
    assert start_and_join(procs) == [0, 0]
    assert [torch.load(out_dir / f"rank{r}.pt")["code"] for r in range(2)] == [0, 0]
    one, _ = read_video(tmp_path / "one.mp4")
    two, _ = read_video(tmp_path / "two.mp4")
    assert one.shape == (5, 32, 32, 3) and one.std() > 1.0 and np.array_equal(one, two)
    assert not list(tmp_path.glob("*.partial*"))  # only rank 0 wrote, atomically


def _gpu_worker(rank, world_size, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = par.init_parallel(mode, guidance_scale=GUIDANCE)  # NCCL on cuda:LOCAL_RANK
    try:
        reference = run_pipeline(tiny_pipeline(ctx.device)).cpu() if rank == 0 else None  # one GPU, no collectives
        pipe = par.parallelize_pipeline(tiny_pipeline(ctx.device), ctx, num_tokens=8)
        torch.save({"x": run_pipeline(pipe).cpu(), "reference": reference,
                    "env": {k: os.environ.get(k) for k in par.SAFE_COLLECTIVE_ENV}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        par.shutdown(ctx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("mode", ["ulysses", "cfg"])
def test_two_gpus_nccl_match_one(mode, tmp_path):
    """On a 2-GPU machine: NCCL ranks (multicast off) give one GPU's latents (tiny pipeline, fp32)."""
    spawn = mp.get_context("spawn")  # CUDA cannot be used in forked children
    port = _free_port()
    procs = [spawn.Process(target=_gpu_worker, args=(r, 2, port, mode, str(tmp_path))) for r in range(2)]
    assert start_and_join(procs, timeout=600) == [0, 0]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in results:
        assert r["env"] == par.SAFE_COLLECTIVE_ENV
        torch.testing.assert_close(r["x"], results[0]["reference"], rtol=1e-3, atol=1e-3)


def test_guided_velocity_single_process_formula():
    calls = []

    def predict(branch):
        calls.append(branch)
        return torch.full((1, 2), 3.0 if branch == "positive" else 1.0)

    v = par.guided_velocity(predict, 5.0)
    assert calls == ["positive", "negative"]
    assert torch.equal(v, torch.full((1, 2), 1.0 + 5.0 * 2.0))
    calls.clear()
    assert torch.equal(par.guided_velocity(predict, 1.0), torch.full((1, 2), 3.0)) and calls == ["positive"]


def test_resolve_mode():
    assert par.resolve_mode("auto", 1, 5.0) == "none"
    assert par.resolve_mode("auto", 2, 5.0) == "cfg"
    assert par.resolve_mode("auto", 8, 5.0) == "cfg-ulysses"
    assert par.resolve_mode("auto", 2, 1.0) == "ulysses"
    assert par.resolve_mode("auto", 3, 5.0) == "ulysses"
    with pytest.raises(UserError, match="exactly 2"):
        par.resolve_mode("cfg", 4, 5.0)
    with pytest.raises(UserError, match="guidance"):
        par.resolve_mode("cfg", 2, 1.0)
    with pytest.raises(UserError, match="torchrun"):
        par.resolve_mode("ulysses", 1, 5.0)
    with pytest.raises(UserError, match="unknown"):
        par.resolve_mode("ring", 2, 5.0)


def test_checks_and_token_count():
    assert par.num_video_tokens(49, 512, 512) == 13 * 32 * 32
    assert par.num_video_tokens(49, 480, 832) == 13 * 30 * 52
    par.check_ulysses(40, 13312, 8)
    with pytest.raises(UserError, match="heads"):
        par.check_ulysses(40, 13312, 3)
    with pytest.raises(UserError, match="tokens"):
        par.check_ulysses(40, 13 * 31 * 51, 2)


def test_safe_env_is_forced():
    env = {"NCCL_NVLS_ENABLE": "1"}
    par.apply_safe_env(env)
    assert env == par.SAFE_COLLECTIVE_ENV
    assert not par.launched_distributed({}) and par.launched_distributed({"RANK": "0", "WORLD_SIZE": "2"})


def test_single_process_context_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = par.init_parallel("auto")
    assert ctx.mode == "none" and ctx.is_main and ctx.cfg_degree == 1
    model = torch.nn.Linear(2, 2)
    assert par.enable_ulysses(model, ctx) is model  # nothing to do on one process


@pytest.mark.parametrize("rank", [0, 1])
def test_torchrun_worker_prints_a_user_error_once(rank, tmp_path, monkeypatch, capsys):
    """Under torchrun every rank hits the same bad input: rank 0 prints the one line, all exit with its code."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = torchrun_cli.main(["--color", str(tmp_path / "color_30.mp4"), "-o", str(tmp_path / "out.mp4"), "--cfg", "nan"])
    assert code == 1
    err = capsys.readouterr().err
    if rank == 0:
        assert err.count("error: ") == 1 and "--cfg" in err and len(err.strip().splitlines()) == 1
    else:
        assert err == ""
    assert not (tmp_path / "out.mp4").exists()


def test_torchrun_worker_refuses_outputs_like_ex4d_generate(tmp_path, monkeypatch, capsys):
    """The worker entry point runs under the same write policy (inputs protected, --overwrite exists)."""
    from ex4d.io.video import write_video

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    write_video(tmp_path / "color_30.mp4", np.zeros((5, 32, 32, 3), np.uint8), 10)
    write_video(tmp_path / "mask_30.mkv", np.full((5, 32, 32), 255, np.uint8), 10, codec="ffv1")
    (tmp_path / "gen.json").write_text("mine")
    argv = ["--color", str(tmp_path / "color_30.mp4"), "-o", str(tmp_path / "gen.mp4"), "--size", "32x32"]
    assert torchrun_cli.main(argv) == 1
    assert "did not write" in capsys.readouterr().err
    assert torchrun_cli.main([*argv[:3], str(tmp_path / "color_30.mp4"), "--overwrite"]) == 1
    assert "input" in capsys.readouterr().err
    assert (tmp_path / "gen.json").read_text() == "mine"


def test_launcher_argv_round_trip():
    """``ex4d generate --nproc-per-node N`` hands its parsed options to the workers as a command line."""
    parser = torchrun_cli.build_parser()
    argv = ["--color", "a.mp4", "-o", "b.mp4", "--seed", "7", "--prompt", "-a prompt with spaces", "--fp8",
            "--parallel", "cfg", "--overwrite", "--cfg", "3.5", "--nproc-per-node", "2"]
    args = parser.parse_args(argv)
    worker = torchrun_cli.argv_from_args(args, parser)
    assert not any(a.startswith("--nproc-per-node") for a in worker)
    again = parser.parse_args(worker)
    assert vars(again) == {**vars(args), "nproc_per_node": 1}


def test_launcher_reports_a_bad_input_as_one_line(tmp_path, capfd):
    """Errors found before any process starts (numbers, files) are one line, with no launcher output."""
    from ex4d.cli import main as cli_main
    from ex4d.io.video import write_video

    write_video(tmp_path / "color_30.mp4", np.zeros((5, 32, 32, 3), np.uint8), 10)
    write_video(tmp_path / "mask_30.mkv", np.full((5, 32, 32), 255, np.uint8), 10, codec="ffv1")
    (tmp_path / "gen.json").write_text("mine")
    common = ["generate", "--color", str(tmp_path / "color_30.mp4"), "--nproc-per-node", "2"]
    assert cli_main([*common, "-o", str(tmp_path / "gen.mp4")]) == 1
    assert cli_main([*common, "-o", str(tmp_path / "x.mp4"), "--seed", "-1"]) == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "did not write" in lines[0] and "--seed" in lines[1]
    assert (tmp_path / "gen.json").read_text() == "mine"


def test_launcher_runs_workers_and_passes_their_exit_code(tmp_path, monkeypatch, capfd):
    """A failure inside the workers (here: weights missing) is their one line and exit code 2, no summary."""
    from ex4d.cli import main as cli_main
    from ex4d.io.video import write_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_video(tmp_path / "color_30.mp4", np.zeros((5, 32, 32, 3), np.uint8), 10)
    write_video(tmp_path / "mask_30.mkv", np.full((5, 32, 32), 255, np.uint8), 10, codec="ffv1")
    code = cli_main(["generate", "--color", str(tmp_path / "color_30.mp4"), "-o", str(tmp_path / "gen.mp4"),
                     "--models-dir", str(tmp_path / "no-models"), "--size", "32x32", "--device", "cpu",
                     "--nproc-per-node", "2"])
    err = capfd.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], err
    assert not (tmp_path / "gen.mp4").exists()


def test_launcher_generates_like_one_process(tmp_path, monkeypatch):
    """``ex4d generate --nproc-per-node 2`` (CFG over 2 CPU processes) writes the one-process video."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_wan import write_tiny_ex4d_ckpt, write_tiny_original_layout

    from ex4d.cli import main as cli_main
    from ex4d.diffusion.weights import models_dir as md
    from ex4d.io.video import read_video, write_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    models = tmp_path / "models"
    write_tiny_original_layout(models / md.WAN_REPO)
    write_tiny_ex4d_ckpt(models / md.EX4D_REPO / md.ADAPTER_CKPT)
    rng = np.random.default_rng(0)
    write_video(tmp_path / "color_30.mp4", (rng.random((5, 32, 32, 3)) * 255).astype(np.uint8), 10)
    mask = np.full((5, 32, 32), 255, np.uint8)
    mask[1:, :, 20:] = 0
    write_video(tmp_path / "mask_30.mkv", mask, 10, codec="ffv1")
    common = ["generate", "--color", str(tmp_path / "color_30.mp4"), "--models-dir", str(models), "--size", "32x32",
              "--steps", "2", "--device", "cpu", "--no-batch-cfg"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main([*common, "-o", str(tmp_path / "one.mp4")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert cli_main([*common, "-o", str(tmp_path / "two.mp4"), "--nproc-per-node", "2", "--parallel", "cfg"]) == 0
    one, _ = read_video(tmp_path / "one.mp4")
    two, _ = read_video(tmp_path / "two.mp4")
    assert one.std() > 1.0 and np.array_equal(one, two)
