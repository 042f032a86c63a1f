"""GroupNorm (+ SiLU) for channels-last activations, as one opaque op with a Triton path on CUDA.

Why: in DepthCrafter's compiled temporal VAE decode at 576x1024, inductor's generated GroupNorm/SiLU
kernels over channels-last activations took 1.07 s of the 1.63 s decode (bench/profile_depth_vae.py):
with 4-16 channels per group strided by C, its reductions read memory far below bandwidth. With these
kernels they take 0.21 s and the decode 1.01 s (H100); eager, the decode goes from 4.7 s to 1.5 s. Here a
channels-last tensor (N, C, *spatial) is read as rows of C contiguous values, x[n, s, c] (N, S, C):

1. ``_stats_kernel``: one program per (n, chunk of rows) computes each channel's mean and centred sum
   of squares over its chunk, in fp32;
2. ``_finalize_kernel``: one program per (n, group) merges the group's (chunk, channel) cells with
   Chan's parallel formula, giving the mean and 1/std as ``F.group_norm`` defines them (biased
   variance, eps inside the root), and folds them and the affine into a scale and shift per channel;
3. ``_apply_kernel``: y = x * a[n, c] + b[n, c] (the affine folded in), then SiLU if asked, stored in
   x's dtype and layout.

So the activation is read twice and written once. Any C works (columns are padded to a power of 2
and masked). Anything else (CPU, no Triton, a layout that is not channels-last, fewer than 3 dims,
more than 8192 channels) goes through ``F.group_norm`` (+ ``F.silu``): the same function with
PyTorch's kernels. :data:`CALLS` counts which path ran so that benchmarks can report it.

:func:`fuse_group_norms` swaps a model's ``GroupNorm`` modules for :class:`FusedGroupNorm`, folding the
SiLU that follows a norm into it where the model's structure makes that unambiguous (a resnet block
without a time embedding, whose ``nonlinearity`` is then only applied after its two norms; a decoder's
``conv_norm_out`` + ``conv_act``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: how many calls took each path since import: {"triton": n, "native": m}
CALLS: collections.Counter = collections.Counter()

#: elements per tile of the normalising kernel (rows = TILE_ELEMENTS // C), and per loop step of the
#: statistics kernel; the statistics kernel runs about STATS_PROGRAMS programs
TILE_ELEMENTS = 8192
STATS_TILE_ELEMENTS = 4096
STATS_PROGRAMS = 2048

_kernels = None


def _triton_kernels():
    """Build the three kernels on first use (Triton is imported only on a CUDA machine that has it)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, S, num_chunks,
                      C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr):
        # One program per (n, chunk of ITERS * ROWS rows); CP = C rounded up to a power of 2. The loop
        # only loads and accumulates, per element, sums of x - x0 and their squares (x0: the chunk's
        # first row, a per-channel shift that keeps the fp32 sums free of cancellation); the
        # cross-thread reductions happen once at the end. Output: per-channel mean and centred sum of
        # squares of this chunk.
        chunk = tl.program_id(0)
        n = tl.program_id(1)
        first = chunk * ITERS * ROWS
        cols = tl.arange(0, CP)
        col_ok = cols < C
        base = x_ptr + n.to(tl.int64) * S * C
        x0 = tl.load(base + first.to(tl.int64) * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc1 = tl.zeros((ROWS, CP), dtype=tl.float32)
        acc2 = tl.zeros((ROWS, CP), dtype=tl.float32)
        for i in range(ITERS):
            rows = first + i * ROWS + tl.arange(0, ROWS)
            ok = (rows < S)[:, None] & col_ok[None, :]
            x = tl.load(base + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=ok, other=0.0)
            d = tl.where(ok, x.to(tl.float32) - x0[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        count = tl.minimum(S - first, ITERS * ROWS).to(tl.float32)  # rows in this chunk
        s1 = tl.sum(acc1, axis=0)
        s2 = tl.sum(acc2, axis=0)
        out = (n * num_chunks + chunk).to(tl.int64) * C + cols
        tl.store(mean_ptr + out, x0 + s1 / count, mask=col_ok)
        tl.store(m2_ptr + out, s2 - s1 * s1 / count, mask=col_ok)

    @triton.jit
    def _finalize_kernel(mean_ptr, m2_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, S, num_chunks,
                         chunk_rows, eps, C: tl.constexpr, CPG: tl.constexpr, CPG_P: tl.constexpr,
                         BLOCK: tl.constexpr):
        # One program per (n, group): Chan's merge over the (chunk, channel) cells of the group, each
        # of `rows in the chunk` values (two passes: the mean, then the centred spread), then 1/std
        # and the affine folded into one scale and shift per channel. CPG_P = CPG rounded up to a
        # power of 2.
        n = tl.program_id(0)
        g = tl.program_id(1)
        j = tl.arange(0, CPG_P)
        chan = g * CPG + j
        chan_ok = j < CPG
        total = S * CPG * 1.0
        acc = tl.zeros((BLOCK, CPG_P), dtype=tl.float32)
        start = 0
        while start < num_chunks:  # (a while loop: Triton's CPU interpreter mishandles range(runtime int))
            chunks = start + tl.arange(0, BLOCK)
            ok = (chunks < num_chunks)[:, None] & chan_ok[None, :]
            rows = tl.minimum(S - chunks * chunk_rows, chunk_rows).to(tl.float32)
            offsets = (n * num_chunks + chunks).to(tl.int64)[:, None] * C + chan[None, :]
            m = tl.load(mean_ptr + offsets, mask=ok, other=0.0)
            acc += tl.where(ok, m * rows[:, None], 0.0)
            start += BLOCK
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros((BLOCK, CPG_P), dtype=tl.float32)
        start = 0
        while start < num_chunks:
            chunks = start + tl.arange(0, BLOCK)
            ok = (chunks < num_chunks)[:, None] & chan_ok[None, :]
            rows = tl.minimum(S - chunks * chunk_rows, chunk_rows).to(tl.float32)
            offsets = (n * num_chunks + chunks).to(tl.int64)[:, None] * C + chan[None, :]
            m = tl.load(mean_ptr + offsets, mask=ok, other=0.0)
            q = tl.load(m2_ptr + offsets, mask=ok, other=0.0)
            spread = m - mean
            acc += tl.where(ok, q + rows[:, None] * spread * spread, 0.0)
            start += BLOCK
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps)
        scale = rstd * tl.load(weight_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
        shift = tl.load(bias_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32) - mean * scale
        tl.store(scale_ptr + n * C + chan, scale, mask=chan_ok)
        tl.store(shift_ptr + n * C + chan, shift, mask=chan_ok)

    @triton.jit
    def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, S,
                      C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr):
        tile = tl.program_id(0)
        n = tl.program_id(1)
        rows = tile * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, CP)
        col_ok = cols < C
        ok = (rows < S)[:, None] & col_ok[None, :]
        offsets = n.to(tl.int64) * S * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + n * C + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + n * C + cols, mask=col_ok, other=0.0)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)

    _kernels = (_stats_kernel, _finalize_kernel, _apply_kernel)
    return _kernels


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """x (N, C, *spatial) -> the same memory as (N, S, C) if it is channels-last (C innermost), else None."""
    moved = x.movedim(1, -1)
    if not moved.is_contiguous():
        return None
    return moved.reshape(x.shape[0], -1, x.shape[1])


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _use_triton(x: torch.Tensor, num_groups: int) -> bool:
    C = x.shape[1]
    return (x.is_cuda and x.dim() >= 3 and x.numel() > 0 and C % num_groups == 0
            and _pow2(C) <= TILE_ELEMENTS and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and _rows_view(x) is not None and _triton_available())


def _native(x, weight, bias, num_groups, eps, silu):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    y = F.silu(y) if silu else y
    # the op's contract (and its fake kernel under torch.compile): the output has x's strides
    return y if y.stride() == x.stride() else torch.empty_like(x).copy_(y)


# needs_exact_strides: under torch.compile, inductor hands the op its inputs with the strides seen
# while tracing, so the channels-last fast path is the one that runs.
@torch.library.custom_op("ex4d::group_norm_act", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                   silu: bool) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, then SiLU if ``silu``. x: (N, C, *spatial).

    The output has x's shape, dtype and memory layout. Inference only (no backward is defined).
    """
    if not _use_triton(x, num_groups):
        CALLS["native"] += 1
        return _native(x, weight, bias, num_groups, eps, silu)
    CALLS["triton"] += 1
    stats_kernel, finalize_kernel, apply_kernel = _triton_kernels()
    N, C = x.shape[:2]
    G = num_groups
    CP = _pow2(C)  # Triton blocks are powers of 2: columns C..CP-1 are masked off
    rows = _rows_view(x)
    S = rows.shape[1]
    # statistics: chunks of `iters` tiles of `stats_rows` rows, about STATS_PROGRAMS programs in all
    stats_rows = min(max(1, STATS_TILE_ELEMENTS // CP), _pow2(S))
    stats_tiles = -(-S // stats_rows)
    iters = _pow2(-(-stats_tiles * N // STATS_PROGRAMS))  # a power of 2: few compiled variants
    num_chunks = -(-stats_tiles // iters)
    chunk_mean = torch.empty(N, num_chunks, C, device=x.device, dtype=torch.float32)
    chunk_m2 = torch.empty_like(chunk_mean)
    stats_kernel[(num_chunks, N)](rows, chunk_mean, chunk_m2, S, num_chunks, C=C, CP=CP, ROWS=stats_rows,
                                  ITERS=iters, num_warps=4)
    scale = torch.empty(N, C, device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    cpg = C // G
    finalize_kernel[(N, G)](chunk_mean, chunk_m2, weight, bias, scale, shift, S, num_chunks, iters * stats_rows,
                            eps, C=C, CPG=cpg, CPG_P=_pow2(cpg), BLOCK=max(1, 2048 // _pow2(cpg)), num_warps=4)
    tile_rows = min(max(1, TILE_ELEMENTS // CP), _pow2(S))
    y = torch.empty_like(x)  # keeps x's channels-last strides
    apply_kernel[(-(-S // tile_rows), N)](rows, _rows_view(y), scale, shift, S, C=C, CP=CP, ROWS=tile_rows,
                                          SILU=silu, num_warps=8)
    return y


@group_norm_act.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    return torch.empty_like(x)


class FusedGroupNorm(torch.nn.Module):
    """A ``GroupNorm`` (its own parameters, shared) computed by :func:`group_norm_act`, SiLU optional.

    State-dict compatible with the ``GroupNorm`` it replaces (``weight``, ``bias``).
    """

    def __init__(self, norm: torch.nn.GroupNorm, silu: bool):
        super().__init__()
        if not norm.affine:
            raise ValueError("FusedGroupNorm needs an affine GroupNorm")
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}"


def _is_silu(module) -> bool:
    return isinstance(module, torch.nn.SiLU)


@dataclass
class FusedNorms:
    """What :func:`fuse_group_norms` changed: counts, and the swaps so that :meth:`undo` restores them."""

    with_silu: int = 0
    plain: int = 0
    swaps: list = field(default_factory=list, repr=False)  # (parent module, attribute, original child)

    def swap(self, parent: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
        self.swaps.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def undo(self) -> None:
        for parent, name, original in reversed(self.swaps):
            setattr(parent, name, original)
        self.swaps.clear()


def fuse_group_norms(model: torch.nn.Module) -> FusedNorms:
    """Swap ``model``'s affine ``GroupNorm`` modules for :class:`FusedGroupNorm`, in place.

    SiLU is folded into the norm where it provably follows it and nothing else:
    - a block with ``norm1``, ``norm2`` and a SiLU ``nonlinearity`` and no ``time_emb_proj`` (diffusers'
      ``ResnetBlock2D`` / ``TemporalResnetBlock`` without time embedding apply ``nonlinearity`` exactly
      once after each norm); its ``nonlinearity`` becomes ``Identity``;
    - a ``conv_norm_out`` followed by a SiLU ``conv_act``; the ``conv_act`` becomes ``Identity``.
    Other norms (attention blocks, resnets with a time embedding) become plain fused norms.

    Values are unchanged up to fp rounding; the state dict keeps its keys. Returns what was swapped
    (``.undo()`` puts the original modules back).
    """
    fused = FusedNorms()
    for module in list(model.modules()):
        if (isinstance(getattr(module, "norm1", None), torch.nn.GroupNorm)
                and isinstance(getattr(module, "norm2", None), torch.nn.GroupNorm)
                and _is_silu(getattr(module, "nonlinearity", None))
                and getattr(module, "time_emb_proj", None) is None
                and module.norm1.affine and module.norm2.affine):
            for name in ("norm1", "norm2"):
                fused.swap(module, name, FusedGroupNorm(getattr(module, name), silu=True))
                fused.with_silu += 1
            fused.swap(module, "nonlinearity", torch.nn.Identity())
        if (isinstance(getattr(module, "conv_norm_out", None), torch.nn.GroupNorm)
                and _is_silu(getattr(module, "conv_act", None)) and module.conv_norm_out.affine):
            fused.swap(module, "conv_norm_out", FusedGroupNorm(module.conv_norm_out, silu=True))
            fused.swap(module, "conv_act", torch.nn.Identity())
            fused.with_silu += 1
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm) and child.affine:
                fused.swap(module, name, FusedGroupNorm(child, silu=False))
                fused.plain += 1
    return fused
