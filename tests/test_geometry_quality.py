"""Geometry-quality metrics on hand-made masks, and DW-Mesh vs torn mesh end to end on a synthetic scene."""

import importlib.util
import math

import numpy as np
import pytest

from ex4d.conventions import reference_intrinsics
from ex4d.errors import InputError
from ex4d.eval.geometry import (
    CaseResult,
    false_visible_rate,
    mask_recall,
    masked_psnr,
    summarize,
    video_metrics,
)
from ex4d.types import Trajectory

# --------------------------------------------------------------------------------------------
# Metrics on synthetic masks (no rendering)


def test_masked_psnr_hand_computed():
    target = np.zeros((4, 4, 3))
    pred = target.copy()
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    pred[:2] += 0.1          # error 0.1 on every masked pixel: MSE 0.01 -> 20 dB
    pred[2:] = 1.0           # large errors outside the mask must not count
    assert masked_psnr(pred, target, mask) == pytest.approx(20.0)
    assert masked_psnr(target, target, mask) == pytest.approx(100.0)  # floored, finite
    assert math.isnan(masked_psnr(pred, target, np.zeros((4, 4), bool)))
    with pytest.raises(ValueError, match="shapes differ"):
        masked_psnr(pred, target, np.ones((3, 4), bool))


def test_false_visible_and_recall_hand_computed():
    mask = np.zeros((3, 3), bool)
    observable = np.zeros((3, 3), bool)
    mask[0, :] = True; mask[1, 0] = True          # 4 kept pixels
    observable[0, :] = True; observable[2, 2] = True  # 3 of them observable, plus one more
    assert false_visible_rate(mask, observable) == pytest.approx(1 / 4)
    assert mask_recall(mask, observable) == pytest.approx(3 / 4)
    assert math.isnan(false_visible_rate(np.zeros((3, 3), bool), observable))
    assert math.isnan(mask_recall(mask, np.zeros((3, 3), bool)))


def test_video_metrics_skips_frame_zero_and_nan_frames():
    T = 3
    gt = np.zeros((T, 4, 4, 3))
    color = gt + 0.1
    color[0] = 1.0  # frame 0 is the source itself and must be ignored
    observable = np.ones((T, 4, 4), bool)
    mask = np.ones((T, 4, 4), bool)
    mask[2] = False  # an empty frame: psnr / false_visible undefined there, recall 0
    out = video_metrics(color, mask, gt, observable)
    assert out["psnr"] == pytest.approx(20.0)  # only frame 1 defines it
    assert out["false_visible"] == pytest.approx(0.0)
    assert out["recall"] == pytest.approx(0.5)  # frames 1 and 2: 1.0 and 0.0
    assert len(out["per_frame"]["recall"]) == T - 1
    with pytest.raises(InputError, match="at least 2 frames"):
        video_metrics(color[:1], mask[:1], gt[:1], observable[:1])


def _case(variant, fv, psnr, recall, traj="30"):
    return CaseResult("boxes", traj, variant, psnr=psnr, psnr_observable=psnr, false_visible=fv, recall=recall,
                      mask_fraction=0.5, observable_fraction=0.5, render_seconds=0.0)


def test_summarize_compares_dwmesh_with_torn():
    results = [_case("dwmesh", 0.01, 28.0, 0.9), _case("torn", 0.11, 24.0, 0.95),
               _case("dwmesh", 0.02, 27.0, 0.8, "60"), _case("torn", 0.02, 27.0, 0.9, "60")]
    summary = summarize(results)
    assert summary["mean_false_visible_reduction"] == pytest.approx(0.05)
    assert summary["mean_psnr_gain"] == pytest.approx(2.0)
    assert summary["mean_recall_change"] == pytest.approx(-0.075)
    assert summary["dwmesh_better_fv"] == "1/2"
    assert summary["mean_torn"]["false_visible"] == pytest.approx(0.065)


# --------------------------------------------------------------------------------------------
# End to end: exact depth -> DW-Mesh / torn mesh -> render -> scored against the analytic view

_MODULES = ("ex4d.camera.trajectory", "ex4d.render.condition", "ex4d.mesh.dwmesh")
_MISSING = [m for m in _MODULES if importlib.util.find_spec(m) is None]
needs_stages = pytest.mark.skipif(bool(_MISSING), reason=f"reconstruction modules not built yet: {_MISSING}")


@pytest.fixture(scope="module")
def boxes_30():
    from ex4d.eval.geometry import evaluate_scene

    results = evaluate_scene("boxes", ["30"], num_frames=5, size=(96, 96))
    return {r.variant: r for r in results}


@needs_stages
def test_dwmesh_leaks_less_than_torn_mesh(boxes_30):
    # Measured (96x96, 5 frames, "30", boxes; commit of this test): dwmesh false-visible 0.0,
    # torn 0.166 (rays slip behind the thin post and show the box behind it), PSNR 27.7 vs 23.5,
    # recall 0.903 vs 0.962. Thresholds leave room for renderer details (antialiasing, flag tests).
    dw, torn = boxes_30["dwmesh"], boxes_30["torn"]
    assert torn.false_visible > 0.05          # the case does exercise leaking
    assert dw.false_visible < 0.01            # measured 0.0
    assert dw.false_visible < torn.false_visible
    assert dw.psnr > 25.0                     # measured 27.7 (resampling of 0.1-m checkers)
    assert dw.recall > 0.8                    # measured 0.903 (curtain + 2-px frame lose some)
    assert torn.recall > dw.recall            # the price of the curtains: a little lost recall
    assert 0.3 < dw.observable_fraction < 0.9  # measured 0.585: the orbit disoccludes and reveals


@needs_stages
def test_identity_path_rerenders_the_source():
    from ex4d.eval.geometry import evaluate_scene

    size = (64, 64)
    identity = Trajectory(np.stack([np.eye(4)] * 3), reference_intrinsics(*size), name="identity")
    (dw,) = evaluate_scene("spheres_moving", [identity], ["dwmesh"], num_frames=3, size=size)
    # Measured: PSNR 100 (exact colours where kept), false-visible 0, recall 0.868 (the always
    # masked 2-px frame is 12 % of 64x64, plus the flagged sphere silhouettes).
    assert dw.trajectory == "identity" and dw.observable_fraction == pytest.approx(1.0)
    assert dw.psnr > 40.0
    assert dw.false_visible == pytest.approx(0.0)
    assert dw.recall > 0.75


def test_unknown_variant_is_rejected():
    from ex4d.eval.geometry import evaluate_scene

    with pytest.raises(InputError, match="unknown variant"):
        evaluate_scene("boxes", ["30"], ["mesh"], num_frames=2, size=(32, 32))
