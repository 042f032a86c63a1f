"""fp8 compute for the DiT's linear layers: row-wise scaled float8_e4m3fn GEMMs (``torch._scaled_mm``).

What is converted: every ``nn.Linear`` inside the transformer blocks (self-attention q/k/v/out,
cross-attention q/k/v/out and the image k/v, the two FFN linears): 99.6 % of the DiT's GEMM
FLOPs. The patch and condition embeddings, the norms, the modulation tables and the output head
stay in their dtype (they are a negligible share of the time and the most sensitive to rounding),
and attention itself stays bf16 here (the self-attention's fp8 kernel is :mod:`ex4d.diffusion.attention_fp8`,
``--attention fp8``).

The maths, for a linear ``y = x W^T + b`` with x: (M, K), W: (N, K):

* weights, once at conversion: per output channel (row of W) ``s_w[n] = max_k |W[n, k]| / 448``
  and ``W8 = fp8(W / s_w)``;
* activations, on the fly in every forward: per token (row of x) ``s_x[m] = max_k |x[m, k]| / 448``
  and ``x8 = fp8(x / s_x)``;
* ``y = (x8 W8^T) * s_x s_w^T + b``, accumulated inside the GEMM (the scales applied in its
  epilogue), written in bf16; the bias is added after it (fused by inductor into the next kernel).

Row-wise scales keep one outlier token or channel from crushing the precision of the others (a
tensor-wise scale would). 448 is float8_e4m3fn's largest finite value.

On a CUDA GPU with fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell) the
GEMM is ``torch._scaled_mm`` (cuBLASLt), about 1.5-1.7x the bf16 rate at the DiT's shapes on an
H100. Where ``_scaled_mm`` has no kernel for the device (the CPU in older torch builds) the same
maths runs as an emulation (upcast, scale, matmul), which is what the CPU tests check against.
The user-facing check (:func:`check_fp8_device`) refuses devices without fp8 tensor cores, so the
emulation is never a silent slow path for a user.

Order in :func:`ex4d.diffusion.performance.apply_performance`: the LoRA is merged first (fp8 holds
W + scale * B A, never the base alone), then fp8, then placement (low-VRAM streaming moves the fp8
weights and their scales like any other parameter/buffer), then ``torch.compile`` (the converted
module is plain torch: inductor fuses the activation quantisation into the neighbouring kernels,
``fullgraph=True`` holds).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ex4d.errors import InputError

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
#: A row (or tensor) of zeros gets this amax (scale ~2e-15), so the division stays finite and it quantises to 0.
AMAX_FLOOR = 1e-12


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) tensor -> (fp8 tensor of the same shape, fp32 scales of shape (..., 1)); t ~= q * scale.

    The scale maps each row's largest magnitude onto 448, float8_e4m3fn's largest finite value.
    """
    t32 = t.float()
    scale = t32.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rowwise`: (..., K) fp8 and (..., 1) scales -> (..., K) in ``dtype``."""
    return (q.float() * scale).to(dtype)


@functools.lru_cache(maxsize=None)
def native_scaled_mm(device_type: str) -> bool:
    """Whether ``torch._scaled_mm`` has a row-wise kernel for this device type (probed once, 16x16)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    try:
        a = torch.zeros(16, 16, dtype=FP8_DTYPE, device=device_type)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device_type),
                         scale_b=torch.ones(1, 16, device=device_type), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def scaled_mm_rowwise(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, *, emulate: bool = False,
                      fast_accum: bool = False) -> torch.Tensor:
    """(M, K) fp8 x (N, K) fp8 with (M, 1) and (N, 1) fp32 scales -> (M, N) bf16 = (x8 s_x)(w8 s_w)^T + bias.

    bias: (N,), added in the GEMM's epilogue (one pass over the output less). emulate: the same
    product by upcasting (devices without an fp8 GEMM kernel). fast_accum: cuBLASLt's fast fp8
    accumulation on Hopper (partial sums are not promoted to full fp32 as often; what torchao's
    float8 training uses for the forward GEMM).
    """
    if emulate:
        y = (x8.float() * x_scale) @ (w8.float() * w_scale).t()
        return (y + bias.float() if bias is not None else y).to(torch.bfloat16)
    # cuBLASLt wants A row-major and B column-major: W8 is (N, K) row-major, so W8.t() is (K, N) column-major.
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(),
                            bias=None if bias is None else bias.to(torch.bfloat16),
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


class Float8Linear(nn.Module):
    """A frozen linear layer with float8_e4m3fn weights and row-wise scales; computes y = x W^T + b.

    Buffers and parameters (all moved by ``.to()``, the low-VRAM streamer and ``state_dict``):
      weight: (out_features, in_features) float8_e4m3fn buffer (frozen; a buffer, so that code
        that reads a model's dtype from its parameters still sees the compute dtype);
      weight_scale: (out_features, 1) float32 buffer;
      bias: (out_features,) parameter in the compute dtype (no gradient), or None.
    The output has the input's dtype (bf16 in the pipeline; fp32 inputs are rounded through bf16).
    """

    #: Defaults for new layers. FAST_ACCUM: cuBLASLt fast accumulation (see :func:`scaled_mm_rowwise`);
    #: on an H100 (bench_fp8.py, fp8 attention on) 1.092 s against 1.183 s per compiled CFG step, and
    #: the guided velocity's deviation from bf16 is the same (relative L2 0.145 against 0.147): on.
    #: BIAS_IN_GEMM: add the bias in the GEMM's epilogue rather than after it (where inductor fuses it
    #: into the next kernel); the GEMM with the bias epilogue measured slower (1.31 s against 1.25 s
    #: per step, two H100 sessions), so off.
    FAST_ACCUM = True
    BIAS_IN_GEMM = False

    def __init__(self, weight8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 *, emulate: bool = False, fast_accum: bool | None = None, bias_in_gemm: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = weight8.shape
        self.register_buffer("weight", weight8)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.emulate = emulate
        self.fast_accum = self.FAST_ACCUM if fast_accum is None else fast_accum
        self.bias_in_gemm = self.BIAS_IN_GEMM if bias_in_gemm is None else bias_in_gemm

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, compute_device: torch.device | str | None = None,
                    emulate: bool | None = None, **flags) -> "Float8Linear":
        """Quantise ``linear`` (its weight read once). The fp8 weight lands where the original weight was.

        compute_device: where to compute the scales (a CPU-resident layer quantised on the GPU is
        ~100x faster than on a few CPU cores); None: where the weight is. flags: ``fast_accum``,
        ``bias_in_gemm`` (None or absent: the class defaults).
        """
        home = linear.weight.device
        w = linear.weight.detach().to(compute_device) if compute_device is not None else linear.weight.detach()
        w8, scale = quantize_rowwise(w)
        bias = None if linear.bias is None else linear.bias.detach()
        if emulate is None:  # decided by where the layer will compute
            emulate = not native_scaled_mm(w.device.type)
        return cls(w8.to(home), scale.to(home), bias, emulate=emulate, **flags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x8, x_scale = quantize_rowwise(x.reshape(-1, shape[-1]))
        in_gemm = self.bias is not None and self.bias_in_gemm
        y = scaled_mm_rowwise(x8, x_scale, self.weight, self.weight_scale, self.bias if in_gemm else None,
                              emulate=self.emulate, fast_accum=self.fast_accum)
        if self.bias is not None and not in_gemm:
            y = y + self.bias.to(y.dtype)  # inductor fuses this into the kernel that reads y next
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """(out_features, in_features) fp32: what the GEMM effectively multiplies by."""
        return dequantize_rowwise(self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8=e4m3 row-wise{', emulated' if self.emulate else ''}"
                f"{', fast accumulation' if self.fast_accum else ''}")


def fp8_linear_names(transformer: nn.Module, multiple: int = 16) -> list[str]:
    """Qualified names of the linears :func:`convert_to_fp8` converts: every nn.Linear under ``blocks``.

    multiple: both GEMM dimensions must be multiples of it (16 for the fp8 kernels; 1 when
    emulating); a linear that is not is left in its dtype (none of Wan2.1-14B's is).
    """
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError("fp8 compute expects a Wan transformer with a `blocks` ModuleList")
    names = []
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if type(module) is nn.Linear and module.in_features % multiple == 0 and module.out_features % multiple == 0:
                names.append(f"blocks.{i}.{name}")
    return names


@torch.no_grad()
def convert_to_fp8(transformer: nn.Module, *, compute_device: torch.device | str | None = None,
                   emulate: bool | None = None) -> int:
    """Replace the blocks' linear layers by :class:`Float8Linear` in place; returns the number converted.

    Merge any LoRA first: a peft-wrapped layer is refused (its base alone would be quantised, and
    the LoRA branch would stay bf16). Each bf16 weight is freed as soon as its fp8 copy exists, so
    the peak is the model plus one layer. compute_device: where the scales are computed (see
    :meth:`Float8Linear.from_linear`).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; be robust to a slim install all the same
        LoraLayer = ()
    if LoraLayer and any(isinstance(m, LoraLayer) for m in transformer.modules()):
        raise ValueError("merge the LoRA before fp8 conversion (peft layers would keep a bf16 side branch)")
    if emulate is None:
        first = next(transformer.parameters())
        emulate = not native_scaled_mm(torch.device(compute_device or first.device).type)
    names = fp8_linear_names(transformer, multiple=1 if emulate else 16)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        setattr(parent, leaf, Float8Linear.from_linear(linear, compute_device=compute_device, emulate=emulate))
        del linear
    transformer._ex4d_fp8 = True
    logger.info("fp8 compute: %d linear layers converted (row-wise scaled float8_e4m3fn)", len(names))
    return len(names)


def check_fp8_device(device: torch.device | str) -> None:
    """One-line InputError unless ``device`` has fp8 tensor cores (CUDA, compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise InputError(f"--fp8 computes on fp8 tensor cores, which the {device.type} device does not have; "
                         "it needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell): "
                         "drop --fp8 or use --device cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(index)
        raise InputError(f"--fp8 needs fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
                         f"{name} is {major}.{minor}: drop --fp8 (or use --low-vram to save memory)")


def fp8_gap() -> str:
    """Why no visible GPU can run ``--fp8``, in a few words (the app shows it); "" when one can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if any(torch.cuda.get_device_capability(i) >= (8, 9) for i in range(torch.cuda.device_count())):
        return ""
    return "this GPU has no fp8 tensor cores"


def check_fp8_available() -> None:
    """One-line InputError unless some visible CUDA GPU has fp8 tensor cores (checked before any weights load;
    :func:`check_fp8_device` checks the device actually used once it is known)."""
    if fp8_gap():  # the full error names the device that falls short
        check_fp8_device(torch.device("cuda", 0) if torch.cuda.is_available() else "cpu")


def velocity_deviation(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Relative L2 (||other - ref|| / ||ref||) and max abs difference, in fp32, as plain floats."""
    ref, out = reference.detach().float(), other.detach().float()
    diff = out - ref
    return {"rel_l2": float(diff.norm() / ref.norm().clamp(min=1e-30)), "max_abs": float(diff.abs().max()),
            "ref_max_abs": float(ref.abs().max())}
