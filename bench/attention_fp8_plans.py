"""Every cuDNN execution plan for the DiT's fp8 self-attention, timed (one Hopper GPU).

``--attention fp8`` (ex4d.diffusion.attention_fp8) builds cuDNN's fp8 flash-attention graph for
q, k, v of shape (B, S, H, D) = (1, 13312, 40, 128) (512x512x49) and runs the first plan cuDNN's
heuristics rank. This script asks the heuristics for every plan they offer (modes A, B and
FALLBACK), builds each, and times each one on the same float8 inputs, in two memory layouts: the
(B, S, H, D) order that the DiT's projections produce (what ex4d binds) and (B, H, S, D), each with
O written in bf16 (Blackwell) and in fp8 (scaled by v's bound, as on Hopper). Each plan's output is
compared with the first plan's (max |difference|), so a faster plan that computes something else
shows.

Prints ONE JSON object: commit, device, cuDNN version, per layout the plans in heuristic order
with their names, workspace, median ms of a call and TFLOP/s.

  python bench/attention_fp8_plans.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from attention_kernels import time_ms  # noqa: E402
from bench_generate import git_commit, note  # noqa: E402

from ex4d.diffusion.attention_fp8 import PROBABILITY_SCALE, _Uid, quantize_tensorwise, sdpa_fp8_graph  # noqa: E402

B, S, H, D = 1, 13312, 40, 128
FLOP = 4 * B * H * S * S * D


def build_all(cudnn, handle, layout: str, fp8_out: bool):
    """ex4d's graph (attention_fp8.sdpa_fp8_graph) in ``layout`` with every plan the heuristics offer
    built; O in bf16, or scaled in fp8 (``fp8_out``)."""
    graph = sdpa_fp8_graph(cudnn, handle, (B, S, S, H, D), fp8_out, heads_major=layout == "bhsd")
    modes = [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK]
    try:
        graph.create_execution_plans(modes)
    except Exception as exc:  # noqa: BLE001 (mode B is not offered everywhere)
        note(f"heuristics A, B, FALLBACK: {exc}; trying A and FALLBACK")
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    return graph


def main() -> int:
    import cudnn

    torch.manual_seed(0)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    (q8, dq), (k8, dk), (v8, dv) = (quantize_tensorwise(t) for t in (q, k, v))
    one = torch.ones(1, device="cuda")
    scale_s = torch.full((1,), PROBABILITY_SCALE, device="cuda")
    result = dict(bench="attention_fp8_plans", commit=git_commit(), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, cudnn_backend=cudnn.backend_version_string(),
                  cudnn_frontend=getattr(cudnn, "__version__", "?"), shape_bshd=[B, S, H, D], layouts={})
    reference = None
    for layout, fp8_out in (("bshd", False), ("bshd", True), ("bhsd", False), ("bhsd", True)):
        tag = f"{layout}_{'fp8' if fp8_out else 'bf16'}_out"
        inputs = (q8, k8, v8) if layout == "bshd" else tuple(t.permute(0, 2, 1, 3).contiguous() for t in (q8, k8, v8))
        try:
            graph = build_all(cudnn, handle, layout, fp8_out)
        except Exception as exc:  # noqa: BLE001 (reported, the other forms still run)
            result["layouts"][tag] = f"not built: {type(exc).__name__}: {exc}"[:300]
            continue
        scale_o = 1.0 / dv if fp8_out else one
        plans = []
        for index in range(graph.get_execution_plan_count()):
            name = graph.get_plan_name_at_index(index)
            try:
                workspace_bytes = graph.get_workspace_size_plan_at_index(index)
                workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device="cuda")
                out = torch.empty(inputs[0].shape, dtype=torch.float8_e4m3fn if fp8_out else torch.bfloat16,
                                  device="cuda")
                amax = torch.empty(2, device="cuda")
                pack = {_Uid.Q: inputs[0], _Uid.K: inputs[1], _Uid.V: inputs[2], _Uid.DESCALE_Q: dq,
                        _Uid.DESCALE_K: dk, _Uid.DESCALE_V: dv, _Uid.DESCALE_S: one / scale_s, _Uid.SCALE_S: scale_s,
                        _Uid.SCALE_O: scale_o, _Uid.O: out, _Uid.AMAX_S: amax[0:1], _Uid.AMAX_O: amax[1:2]}

                def run(pack=pack, workspace=workspace, index=index):
                    graph.execute_plan_at_index(pack, workspace, index, handle=handle)

                ms = time_ms(run)
                o = out.float() / scale_o
                bshd_out = o if layout == "bshd" else o.permute(0, 2, 1, 3)
                if reference is None:
                    reference = bshd_out.clone()
                diff = (bshd_out - reference).abs().max().item()
                plans.append(dict(index=index, name=name, workspace_mib=round(workspace_bytes / 2**20, 1),
                                  ms=round(ms, 3), tflops=round(FLOP / ms / 1e9, 1), max_abs_vs_first=diff))
            except Exception as exc:  # noqa: BLE001 (a plan that will not run is reported, not fatal)
                plans.append(dict(index=index, name=name, error=f"{type(exc).__name__}: {exc}"[:300]))
            note(f"{tag} plan {index}: {plans[-1]}")
        result["layouts"][tag] = plans
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
