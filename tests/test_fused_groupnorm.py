"""The fused GroupNorm(+SiLU) op: module swaps keep the models' outputs, the Triton path matches F.group_norm.

On the CPU the op runs F.group_norm; the Triton kernels run on CUDA (``-m gpu``) and, where the
``triton`` package is installed, in Triton's CPU interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ex4d.depth import fused_groupnorm
from ex4d.depth.depthcrafter import DepthCrafterPipeline, DepthCrafterSettings
from ex4d.depth.fused_groupnorm import FusedGroupNorm, fuse_group_norms, group_norm_act

from test_depthcrafter import TINY_VAE, estimator, frames, models_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_vae():
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    return AutoencoderKLTemporalDecoder(**TINY_VAE).eval().requires_grad_(False)


def test_swaps_fold_silu_only_where_it_follows_the_norm():
    vae = _tiny_vae()
    norms_before = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
    keys = {k: v.shape for k, v in vae.state_dict().items()}
    fused = fuse_group_norms(vae)
    assert fused.with_silu + fused.plain == norms_before
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
    # the mid-block attention norm is not followed by SiLU
    attention_norm = vae.decoder.mid_block.attentions[0].group_norm
    assert isinstance(attention_norm, FusedGroupNorm) and not attention_norm.silu
    resnet = vae.decoder.up_blocks[0].resnets[0].spatial_res_block
    assert resnet.norm1.silu and resnet.norm2.silu and isinstance(resnet.nonlinearity, torch.nn.Identity)
    assert vae.decoder.conv_norm_out.silu and isinstance(vae.decoder.conv_act, torch.nn.Identity)
    assert {k: v.shape for k, v in vae.state_dict().items()} == keys  # loads the same files
    fused.undo()
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules()) == norms_before
    assert isinstance(resnet.nonlinearity, torch.nn.SiLU) and isinstance(vae.decoder.conv_act, torch.nn.SiLU)


def test_norms_with_a_time_embedding_keep_their_silu():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8).eval()
    x, temb = torch.randn(2, 32, 6, 6), torch.randn(2, 16)
    expected = block(x, temb)
    fused = fuse_group_norms(block)
    assert fused.with_silu == 0 and fused.plain == 2  # nonlinearity also acts on temb: left alone
    assert isinstance(block.nonlinearity, torch.nn.SiLU)
    torch.testing.assert_close(block(x, temb), expected)


def test_fused_decoder_gives_the_same_frames():
    vae = _tiny_vae()
    z = torch.randn(5, 4, 6, 8)
    indicator = torch.zeros(1, 5)
    with torch.no_grad():
        expected = vae.decoder(z, num_frames=5, image_only_indicator=indicator)
        fuse_group_norms(vae)
        fused_native = vae.decoder(z, num_frames=5, image_only_indicator=indicator)
    torch.testing.assert_close(fused_native, expected, rtol=1e-5, atol=1e-5)


def test_op_matches_group_norm_and_compiles():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16), torch.randn(16)
    for silu in (False, True):
        ref = F.group_norm(x, 4, w, b, 1e-6)
        ref = F.silu(ref) if silu else ref
        torch.testing.assert_close(group_norm_act(x, w, b, 4, 1e-6, silu), ref)
    norm = FusedGroupNorm(torch.nn.GroupNorm(4, 16), silu=True)
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)  # an opaque op: no graph break
    with torch.no_grad():  # inference only: the op has no backward
        torch.testing.assert_close(compiled(x), norm(x))


def test_pipeline_setting(estimator):  # noqa: F811
    pipe = estimator.pipeline
    f = frames(T=9)
    reference = pipe(f)
    other = DepthCrafterPipeline(pipe.unet, _copy(pipe.vae), pipe.image_encoder, device="cpu",
                                 dtype=torch.float32, settings=DepthCrafterSettings(fused_group_norm=True))
    assert len(other.fused_norms) == 1  # the VAE (an fp32 model has no separate encoder copy)
    assert other.fused_norms[0].with_silu > 0 and other.fused_norms[0].plain == 2  # the two attention norms
    np.testing.assert_allclose(other(f), reference, atol=1e-5)


def _copy(module):
    import copy

    return copy.deepcopy(module)


_CASES = [((2, 128, 9, 7), torch.channels_last), ((1, 64, 3, 5, 6), torch.channels_last_3d),
          ((2, 128, 30, 7), torch.channels_last),  # several tiles, the last one short
          ((2, 512, 4, 4), torch.channels_last), ((3, 256, 300), "rows"),
          ((1, 128, 300, 30), torch.channels_last),  # many chunks: several merge steps
          ((2, 320, 6, 5), torch.channels_last), ((1, 96, 3, 4, 5), torch.channels_last_3d),  # C not a power of 2
          ((1, 320, 40, 40), torch.channels_last)]  # 200 chunks: two merge steps of 128


def _make(shape, layout, dtype, device):
    x = (torch.randn(shape, device=device) * 3 + 5).to(dtype)  # an offset mean tests the centred variance
    if layout == "rows":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=layout)


def _check_triton_path(device, dtype, tol):
    before = fused_groupnorm.CALLS["triton"]
    for shape, layout in _CASES:
        x = _make(shape, layout, dtype, device)
        w, b = torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)
        for silu in (False, True):
            y = group_norm_act(x, w, b, 32, 1e-6, silu)
            ref = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
            ref = F.silu(ref) if silu else ref
            assert y.dtype == x.dtype and y.stride() == x.stride()
            assert torch.isfinite(y).all()
            assert float((y.double() - ref).norm() / ref.norm()) < tol, (shape, silu)
    assert fused_groupnorm.CALLS["triton"] - before == 2 * len(_CASES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("programs", [fused_groupnorm.STATS_PROGRAMS, 3])  # 3: several loop steps each
def test_triton_path_on_cuda(dtype, tol, programs, monkeypatch):
    monkeypatch.setattr(fused_groupnorm, "STATS_PROGRAMS", programs)
    torch.manual_seed(2)
    _check_triton_path("cuda", dtype, tol)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton package is not installed")
def test_triton_kernels_in_the_interpreter():
    """The same kernels through TRITON_INTERPRET=1 on CPU tensors (a fresh process: the flag is read at import)."""
    code = textwrap.dedent("""
        import torch
        import ex4d.depth.fused_groupnorm as fg
        import test_fused_groupnorm as t
        fg._use_triton = lambda x, g: x.dim() >= 3 and fg._rows_view(x) is not None
        torch.manual_seed(3)
        t._check_triton_path("cpu", torch.float32, 1e-5)
        fg.STATS_PROGRAMS = 3  # several loop steps per statistics program
        t._check_triton_path("cpu", torch.float32, 1e-5)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
