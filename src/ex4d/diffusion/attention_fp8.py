"""fp8 self-attention for the DiT: cuDNN's float8 flash attention (``--attention fp8``).

Why: with the linear layers in fp8 (:mod:`ex4d.diffusion.fp8`), the bf16 attention over the
13,312 video tokens is about 0.52 s of a 1.25 s CFG step on an H100. cuDNN has a flash-attention
kernel whose two products (QK^T and PV) run on the fp8 tensor cores; it is reached through NVIDIA's
``nvidia-cudnn-frontend`` package (the ``fp8-attention`` extra: ``pip install -e ".[fp8-attention]"``).

What changes: only the 40 blocks' self-attention (``attn1``). Its projections, RMS norms and RoPE
are computed as in diffusers' ``WanAttnProcessor`` (the processor here is checked against it
bit for bit with an exact kernel in the tests); then, per call, with q, k, v: (B, S, H, D) bf16:

* k is centred over the tokens (``k - mean_s k``). Every query's scores then shift by one
  constant, which the softmax removes exactly, and the keys' range shrinks before quantisation;
* q, k and v are each scaled as a whole so that their largest magnitude maps onto 448 (float8
  e4m3's largest value) and rounded to float8 e4m3 (cuDNN's fp8 attention takes one scale per tensor);
* cuDNN computes the scores in fp32, the softmax in fp32, rounds the probabilities (<= 1, scaled
  by 448) to fp8 for the product with v, accumulates in fp32 and writes bf16 (on GPUs where cuDNN
  only writes fp8, the output is scaled onto 448 by v's bound, written in fp8 and scaled back).

The cross-attentions (512 text and 257 image keys) stay bf16: they are under 6 % of the attention
arithmetic. Works with ``torch.compile`` (the kernel is a custom op the compiler treats as
opaque; the quantisation around it is fused), fp8 or bf16 linears, merged LoRAs and the
low-VRAM streaming. Not with several GPUs (the sequence-parallel attention is diffusers' own).

On the CPU (tests) :func:`fp8_attention` can emulate the maths: same quantisation of q, k, v and
of the probabilities, in fp32 otherwise; close to cuDNN's (which quantises the probabilities
tile by tile, before the softmax's normalisation) but not bit-identical.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
from torch import nn

from ex4d.diffusion.fp8 import AMAX_FLOOR, FP8_DTYPE, FP8_MAX
from ex4d.errors import InputError

logger = logging.getLogger(__name__)

#: Scale of the softmax probabilities before their fp8 rounding (they lie in [0, 1]).
PROBABILITY_SCALE = FP8_MAX
INSTALL_HINT = "pip install nvidia-cudnn-frontend (ex4d's fp8-attention extra)"


def quantize_tensorwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any tensor -> (float8 e4m3 tensor of the same shape, fp32 descale of shape (1,)); t ~= q * descale."""
    t32 = t.float()
    descale = t32.abs().amax().clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (t32 / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, descale.reshape(1)


def centre_keys(k: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> k minus its mean over the S tokens (per batch, head and channel), in fp32.

    softmax(q (k - m)^T) = softmax(q k^T - q m^T), and q m^T is the same for every key of a query:
    the attention is unchanged, the keys' range (what the fp8 scale must cover) is smaller.
    """
    k32 = k.float()
    return k32 - k32.mean(dim=1, keepdim=True)


def emulated_sdpa_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                      descale_k: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    """fp8 attention's maths in fp32 (CPU tests): (B, S, H, D) float8 q/k/v and (1,) descales -> (B, S, H, D) bf16."""
    q = q8.float() * descale_q
    k = k8.float() * descale_k
    v = v8.float() * descale_v
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probabilities = scores.softmax(dim=-1)
    probabilities = (probabilities * PROBABILITY_SCALE).to(FP8_DTYPE).float() / PROBABILITY_SCALE
    return torch.einsum("bhqk,bkhd->bqhd", probabilities, v).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# cuDNN


def _cudnn():
    try:
        import cudnn
    except ImportError as exc:
        raise InputError(f"--attention fp8 needs NVIDIA's cuDNN frontend ({exc}): {INSTALL_HINT}, "
                         "or use --attention native") from None
    return cudnn


@functools.lru_cache(maxsize=None)
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return _cudnn().create_handle()


class _Uid:
    Q, K, V, O = 1, 2, 3, 4
    DESCALE_Q, DESCALE_K, DESCALE_V, DESCALE_S, SCALE_S, SCALE_O = 5, 6, 7, 8, 9, 10
    AMAX_S, AMAX_O = 11, 12


class _Plan:
    """One built cuDNN fp8 attention graph for one shape and output type (:func:`cudnn_plan`).

    :meth:`constants` gives its constant (1,) fp32 inputs (1, the probabilities' scale and its
    inverse), made once on its GPU rather than in each of the 80 calls of a CFG step, and only when the
    graph first runs: :func:`fp8_output` builds plans while torch.compile traces, where no tensor
    should be made.
    """

    def __init__(self, graph, workspace_bytes: int, device: torch.device):
        self.graph, self.workspace_bytes, self.device = graph, workspace_bytes, device
        self._constants: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(one, scale_s, descale_s) on the plan's GPU."""
        if self._constants is None:
            one = torch.ones(1, dtype=torch.float32, device=self.device)
            scale_s = torch.full((1,), PROBABILITY_SCALE, dtype=torch.float32, device=self.device)
            self._constants = (one, scale_s, one / scale_s)
        return self._constants


def sdpa_fp8_graph(cudnn, handle, shape: tuple[int, int, int, int, int], fp8_out: bool, *,
                   heads_major: bool = False):
    """cuDNN's fp8 attention as an operation graph, before its execution plans: q (B, Sq, H, D) and
    k/v (B, Skv, H, D) in (B, S, H, D) memory order, or (B, H, S, D) with ``heads_major``; O in bf16,
    or (``fp8_out``) scaled into fp8. Tensors are bound by the uids of :class:`_Uid`."""
    b, s_q, s_kv, h, d = shape
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def stride(s):  # of logical (B, H, S, D) dims over the memory order
        return (h * s * d, s * d, d, 1) if heads_major else (s * h * d, d, h * d, 1)

    def qkv(uid, s):
        return graph.tensor(uid=uid, dim=(b, h, s, d), stride=stride(s), data_type=cudnn.data_type.FP8_E4M3)

    def scalar(uid):
        return graph.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)

    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=qkv(_Uid.Q, s_q), k=qkv(_Uid.K, s_kv), v=qkv(_Uid.V, s_kv), descale_q=scalar(_Uid.DESCALE_Q),
        descale_k=scalar(_Uid.DESCALE_K), descale_v=scalar(_Uid.DESCALE_V), descale_s=scalar(_Uid.DESCALE_S),
        scale_s=scalar(_Uid.SCALE_S), scale_o=scalar(_Uid.SCALE_O), generate_stats=False,
        attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
    o.set_uid(_Uid.O).set_output(True).set_dim((b, h, s_q, d)).set_stride(stride(s_q)) \
        .set_data_type(cudnn.data_type.FP8_E4M3 if fp8_out else cudnn.data_type.BFLOAT16)
    for tensor, uid in ((amax_s, _Uid.AMAX_S), (amax_o, _Uid.AMAX_O)):
        tensor.set_uid(uid).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)) \
            .set_data_type(cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    return graph


def _build(cudnn, handle, shape: tuple[int, int, int, int, int], fp8_out: bool) -> _Plan:
    """The graph for q (B, Sq, H, D) and k/v (B, Skv, H, D) in (B, S, H, D) memory order, with the first
    plan cuDNN's heuristics rank that builds."""
    graph = sdpa_fp8_graph(cudnn, handle, shape, fp8_out)
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Plan(graph, graph.get_workspace_size(), torch.device("cuda", torch.cuda.current_device()))


_PLANS: dict[tuple, _Plan] = {}


def cudnn_plan(device_index: int, shape: tuple[int, int, int, int, int], fp8_out: bool) -> _Plan:
    """The built graph for (B, Sq, Skv, H, D) on a GPU, writing O in bf16 or (``fp8_out``) in fp8."""
    key = (device_index, shape, fp8_out)
    plan = _PLANS.get(key)
    if plan is None:
        cudnn = _cudnn()
        with torch.cuda.device(device_index):
            try:
                plan = _build(cudnn, _handle(device_index), shape, fp8_out)
            except Exception as exc:  # cudnnGraphNotSupportedError or a build failure
                name = torch.cuda.get_device_name(device_index)
                raise InputError(f"cuDNN {cudnn.backend_version_string()} has no fp8 attention kernel with "
                                 f"{'fp8' if fp8_out else 'bf16'} output for (B, Sq, Skv, H, D) = {shape} on {name} "
                                 f"({type(exc).__name__}: {str(exc)[:300]}): use --attention native") from None
        logger.info("cuDNN fp8 attention for (B, Sq, Skv, H, D) = %s: %s output", shape, "fp8" if fp8_out else "bf16")
        _PLANS[key] = plan
    return plan


#: The shape :func:`fp8_output` builds to ask cuDNN which output it has (the DiT's heads, a short sequence).
PROBE_SHAPE = (1, 256, 256, 40, 128)


_FP8_OUTPUT: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def fp8_output(device: torch.device) -> bool:
    """Whether cuDNN's fp8 attention must write O in fp8 on this GPU (True) or can write bf16 (False).

    bf16 needs Blackwell and cuDNN 9.13+; Hopper writes fp8. A constant to torch.compile: the
    scaling back of an fp8 O is then traced with the ops around it and fuses into the output
    projection's quantisation (about 0.04 s of a CFG step on an H100 when it ran eagerly). It only
    builds cuDNN graphs, and makes no tensor: the compiler calls it while tracing.
    """
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    known = _FP8_OUTPUT.get(device_index)
    if known is None:  # once per GPU: a failed build is not cached by cudnn_plan, and is slow
        try:
            cudnn_plan(device_index, PROBE_SHAPE, fp8_out=False)
            known = False
        except InputError:
            cudnn_plan(device_index, PROBE_SHAPE, fp8_out=True)  # neither output: its one-line error
            known = True
        _FP8_OUTPUT[device_index] = known
    return known


@torch.library.custom_op("ex4d::sdpa_fp8_cudnn", mutates_args=(), device_types="cuda")
def sdpa_fp8_cudnn(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                   descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                   fp8_out: bool) -> torch.Tensor:
    """cuDNN fp8 attention: (B, S, H, D) float8 e4m3 q/k/v and (1,) fp32 descales -> (B, Sq, H, D) O.

    ``fp8_out`` False: O in bf16 (``scale_o`` unused). True: O * ``scale_o`` in float8 e4m3; the
    caller divides by ``scale_o`` (outside this op, so that torch.compile can fuse it).
    """
    b, s_q, h, d = q8.shape
    s_kv = k8.shape[1]
    q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    device_index = q8.device.index if q8.device.index is not None else torch.cuda.current_device()
    plan = cudnn_plan(device_index, (b, s_q, s_kv, h, d), fp8_out)
    cudnn = _cudnn()
    handle = _handle(device_index)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    out = torch.empty(b, s_q, h, d, dtype=FP8_DTYPE if fp8_out else torch.bfloat16, device=q8.device)
    amax = torch.empty(2, dtype=torch.float32, device=q8.device)
    workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=q8.device)
    one, scale_s, descale_s = plan.constants()
    plan.graph.execute({_Uid.Q: q8, _Uid.K: k8, _Uid.V: v8, _Uid.DESCALE_Q: descale_q.float(),
                        _Uid.DESCALE_K: descale_k.float(), _Uid.DESCALE_V: descale_v.float(),
                        _Uid.DESCALE_S: descale_s, _Uid.SCALE_S: scale_s,
                        _Uid.SCALE_O: scale_o.float() if fp8_out else one,
                        _Uid.O: out, _Uid.AMAX_S: amax[0:1], _Uid.AMAX_O: amax[1:2]}, workspace, handle=handle)
    return out


@sdpa_fp8_cudnn.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, fp8_out):
    return q8.new_empty((*q8.shape[:-1], v8.shape[-1]), dtype=FP8_DTYPE if fp8_out else torch.bfloat16)


@sdpa_fp8_cudnn.register_kernel("cpu")
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, fp8_out):
    """The op's maths emulated on the CPU (tests): :func:`emulated_sdpa_fp8`, then O as cuDNN writes it."""
    out = emulated_sdpa_fp8(q8, k8, v8, descale_q, descale_k, descale_v).contiguous()  # as the fake's, cuDNN's
    return (out.float() * scale_o).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE) if fp8_out else out


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, emulate: bool = False) -> torch.Tensor:
    """Attention over (B, S, H, D) q, k, v with fp8 products; returns (B, Sq, H, D) bf16 (see the module notes)."""
    q8, descale_q = quantize_tensorwise(q)
    k8, descale_k = quantize_tensorwise(centre_keys(k))
    v8, descale_v = quantize_tensorwise(v)
    if emulate:
        return emulated_sdpa_fp8(q8, k8, v8, descale_q, descale_k, descale_v)
    return cudnn_attention_fp8(q8, k8, v8, descale_q, descale_k, descale_v)


def cudnn_attention_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                        descale_k: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    """cuDNN's fp8 attention on quantised (B, S, H, D) q/k/v and their (1,) descales -> (B, Sq, H, D) bf16.

    Where cuDNN writes O in fp8 (Hopper), the scaling back happens here, outside the op, so that
    torch.compile fuses it into the next kernel.
    """
    if not fp8_output(q8.device):
        return sdpa_fp8_cudnn(q8, k8, v8, descale_q, descale_k, descale_v, descale_v, False)
    # O is a convex combination of v's rows, so |O| <= max |v|: 1 / descale_v maps it onto fp8's range.
    scale_o = 1.0 / descale_v
    out8 = sdpa_fp8_cudnn(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, True)
    return (out8.float() / scale_o).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The processor


def rotate_pairs(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on (B, S, H, D): each channel pair (2i, 2i+1) is rotated by its angle; result in x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class FP8SelfAttentionProcessor:
    """Processor for a Wan block's self-attention (``attn1``) with the attention product in fp8.

    Everything but the product is diffusers' ``WanAttnProcessor`` computation: q/k/v projections
    (fused or not), RMS norms on q and k, heads split, RoPE, then the output projection.
    hidden_states: (B, S, dim) -> (B, S, dim).
    """

    def __init__(self, emulate: bool = False):
        self.emulate = emulate

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("FP8SelfAttentionProcessor serves self-attention without a mask only")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate_pairs(query, *rotary_emb), rotate_pairs(key, *rotary_emb)
        out = fp8_attention(query, key, value, emulate=self.emulate).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def check_fp8_attention_device(device: torch.device | str) -> None:
    """One-line InputError unless ``device`` can run cuDNN's fp8 attention (CUDA, Hopper or newer, the package)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise InputError(f"--attention fp8 runs cuDNN's fp8 attention on a CUDA GPU (Hopper or newer), not the "
                         f"{device.type} device: drop --attention fp8 or use --device cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        raise InputError(f"--attention fp8 needs a Hopper or newer GPU (compute capability 9.0+); "
                         f"{torch.cuda.get_device_name(index)} is {major}.{minor}: use --attention native")
    _cudnn()
    fp8_output(torch.device("cuda", index))  # an unsupported cuDNN says so now, not after the weights load


def _hopper_gap() -> str:
    """Why no visible GPU is Hopper or newer, in a few words; "" when one is."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if not any(torch.cuda.get_device_capability(i)[0] >= 9 for i in range(torch.cuda.device_count())):
        return "needs a Hopper or newer GPU"
    return ""


def fp8_attention_gap() -> str:
    """Why this machine cannot run ``--attention fp8``, in a few words (the app shows it); "" when it can.
    The package is only looked up, not imported."""
    gpu = _hopper_gap()
    if gpu:
        return gpu
    return "" if importlib.util.find_spec("cudnn") is not None else "pip install nvidia-cudnn-frontend"


def check_fp8_attention_available() -> None:
    """One-line InputError unless some visible GPU is Hopper or newer and the cuDNN frontend imports: checked
    before any weights load (:func:`check_fp8_attention_device` checks the device used once it is known)."""
    if _hopper_gap():  # the full error names the device that falls short
        check_fp8_attention_device(torch.device("cuda", 0) if torch.cuda.is_available() else "cpu")
    _cudnn()


def use_fp8_self_attention(transformer: nn.Module, *, emulate: bool = False) -> int:
    """Give every block's ``attn1`` the fp8 processor; returns how many. ``emulate``: CPU maths (tests)."""
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError("fp8 attention expects a Wan transformer with a `blocks` ModuleList")
    processor = FP8SelfAttentionProcessor(emulate=emulate)
    for block in blocks:
        block.attn1.set_processor(processor)
    logger.info("fp8 self-attention (cuDNN%s) in %d blocks", ", emulated" if emulate else "", len(blocks))
    return len(blocks)
