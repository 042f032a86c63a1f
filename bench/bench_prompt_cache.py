"""What the prompt-embedding cache saves: umT5 load + encode (a miss) against reading the cache (a hit).

Prints ONE JSON object: git commit, device, versions, the T5 file's size, and per path (``miss``:
``load_t5_original`` of Wan's ``.pth`` + the two prompt encodings, as a generation without a cache
does; ``hit``: the two cached embeddings read back, as a generation with a warm cache does) the
median seconds of --runs runs (each in a fresh process, after one warm-up run), the child's peak
resident memory (VmHWM) and its peak GPU memory. ``checksums_equal``: the two paths' embeddings
have the same sums (tests/test_prompt_cache.py checks bit equality).

Weights: the full-size umT5-XXL encoder (5.7 B parameters, Wan's config) built on the meta device,
filled with N(0, 0.02) in bf16 and saved with Wan's key names, like
``models_t5_umt5-xxl-enc-bf16.pth`` (11.4 GB); a tokenizer of the tiny test vocabulary (the
encoder runs over the padded 512 tokens either way). The file was just written, so it is read from
the page cache where memory allows: the miss figure is a lower bound on a cold disk.

  python bench/bench_prompt_cache.py                  # full size, on the GPU if there is one
  python bench/bench_prompt_cache.py --tiny           # tiny CPU check of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

_MARK = "ex4d-bench-result:"


def write_t5(folder: Path, tiny: bool) -> Path:
    """Wan's T5 file (random weights, Wan's key names) and a tokenizer folder in ``folder``."""
    from bench_generate import materialise
    from transformers import UMT5Config, UMT5EncoderModel

    import tiny_wan
    from ex4d.diffusion.weights import keymaps as km
    from ex4d.diffusion.weights import models_dir as md

    if tiny:
        model = tiny_wan.make_tiny_components(0)["text_encoder"]
    else:
        with torch.device("meta"):
            model = UMT5EncoderModel(UMT5Config(**km.T5_CONFIG))
        materialise(model, "cpu", torch.bfloat16)
    state = {}
    for key, value in model.state_dict().items():
        name = km.t5_key_to_original(key)
        if name is not None:
            state[name] = value.contiguous()
    path = folder / md.T5_FILE
    torch.save(state, path)
    del state, model
    tiny_wan.make_tiny_components(0)["tokenizer"].save_pretrained(str(folder / md.TOKENIZER_DIR))
    return path


def child(mode: str, folder: Path, cache: Path, device: str) -> dict:
    """One run of ``mode`` in this (fresh) process: seconds, and the embeddings' checksum."""
    from ex4d.diffusion import prompt_cache
    from ex4d.diffusion.pipeline import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, encode_text
    from ex4d.diffusion.weights import models_dir as md
    from ex4d.diffusion.weights.wan import TEXT_LENGTH, load_t5_original, load_tokenizer

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    prompts = {"positive": DEFAULT_PROMPT, "negative": DEFAULT_NEGATIVE_PROMPT}
    identity = {"files": [[str(folder / md.T5_FILE), (folder / md.T5_FILE).stat().st_size, 0]]}
    keys = {name: prompt_cache.cache_key(text, encoder=identity, text_len=TEXT_LENGTH, dtype=dtype,
                                         device_type=dev.type) for name, text in prompts.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    if mode == "miss":
        encoder = load_t5_original(folder / md.T5_FILE, torch_dtype=dtype, device=dev)
        tokenizer = load_tokenizer(folder / md.TOKENIZER_DIR)
        with torch.no_grad():
            embeds = {name: encode_text(tokenizer, encoder, text, dev, dtype) for name, text in prompts.items()}
    else:
        embeds = {name: prompt_cache.load(cache, key).to(dev) for name, key in keys.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if mode == "miss":
        for name, key in keys.items():
            if prompt_cache.load(cache, key) is None:
                prompt_cache.store(cache, key, embeds[name])
    checksum = {name: float(e.double().abs().sum()) for name, e in embeds.items()}
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"seconds": seconds, "checksum": checksum, "peak_rss_gib": int(hwm) / 2**20,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
            "shape": list(embeds["positive"].shape), "dtype": str(dtype)}


def run_child(mode: str, folder: Path, cache: Path, device: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(folder), "--cache", str(cache),
                           "--device", device], capture_output=True, text=True)
    if proc.returncode != 0 or _MARK not in proc.stdout:
        raise SystemExit(f"{mode} run failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.rsplit(_MARK, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny CPU model (checks the script, not the speed)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per path after one warm-up (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where umT5 runs (default: cuda if available, else cpu)")
    parser.add_argument("--workdir", default=None, help="folder for the 11.4 GB T5 file (default: a temp folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(_MARK + json.dumps(child(args.child, Path(args.folder), Path(args.cache), args.device)))
        return

    from bench_generate import git_commit

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder, cache = Path(work) / "wan", Path(work) / "prompt_cache"
        folder.mkdir()
        started = time.perf_counter()
        t5_path = write_t5(folder, args.tiny)
        write_s = time.perf_counter() - started
        results = {}
        for mode in ("miss", "hit"):  # the first miss fills the cache; each path gets one warm-up run
            runs = [run_child(mode, folder, cache, args.device) for _ in range(args.runs + 1)][1:]
            results[mode] = {
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "seconds_runs": [round(r["seconds"], 4) for r in runs],
                "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
                "peak_gpu_gib": max((r["peak_gpu_gib"] or 0.0) for r in runs) if args.device != "cpu" else None,
                "checksum": runs[-1]["checksum"], "shape": runs[-1]["shape"], "dtype": runs[-1]["dtype"]}
        import diffusers
        import transformers

        out = {
            "bench": "prompt_cache", "git_commit": git_commit(), "device": (torch.cuda.get_device_name()
                                                                          if args.device.startswith("cuda")
                                                                          else "cpu"),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "tiny": args.tiny, "t5_file_gb": t5_path.stat().st_size / 1e9, "write_t5_s": round(write_s, 1),
            "cache_entries_kb": sorted(round(p.stat().st_size / 1024, 1) for p in cache.glob("*.safetensors")),
            "checksums_equal": results["miss"]["checksum"] == results["hit"]["checksum"],
            "miss": results["miss"], "hit": results["hit"],
            "saved_s": results["miss"]["seconds_median"] - results["hit"]["seconds_median"],
            "note": "miss = load_t5_original + tokenizer + 2 encodings; hit = 2 cache reads; the T5 file was just "
                    "written (page cache warm where RAM allows); each run in a fresh process",
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
