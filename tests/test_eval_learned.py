"""ex4d eval's opt-in learned metrics: VBench's consistency formula by hand, tiny DINO/CLIP encoders
saved in the transformers layout and loaded through the real loader, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ex4d.eval.learned import IMAGENET_MEAN, IMAGENET_STD, FrameEncoder, consistency_score


def test_consistency_formula_by_hand():
    feats = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    score, per = consistency_score(feats)
    assert math.isnan(per[0])
    # frame 1: cos to previous 1, to first 1 -> 1; frame 2: 0 and 0 -> 0;
    # frame 3: cos to previous 0, to first -1 (clamped to 0) -> 0.
    assert per[1:].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert score == pytest.approx(1.0 / 3.0)
    half = np.array([[1.0, 0.0], [math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    assert consistency_score(half)[0] == pytest.approx(0.5)  # cos 60 deg to both previous and first
    with pytest.raises(ValueError, match="at least 2 frames"):
        consistency_score(feats[:1])


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                             image_size=224, patch_size=16), add_pooling_layer=False)
    vit.save_pretrained(root / "dino")
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=48, image_size=224, patch_size=32,
                                                          projection_dim=16))
    clip.save_pretrained(root / "clip")
    return root


def test_dino_features_equal_the_model_on_hand_normalised_input(tiny_encoders):
    import torch
    from transformers import ViTModel

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)  # already 224: resizing is the identity
    feats = FrameEncoder("dino", tiny_encoders / "dino", device="cpu")(frames)
    model = ViTModel.from_pretrained(tiny_encoders / "dino", add_pooling_layer=False).eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    assert feats.shape == (3, 32)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)


def test_still_video_is_fully_consistent_and_noise_is_not(tiny_encoders):
    rng = np.random.default_rng(1)
    still = np.repeat(rng.integers(0, 256, (1, 96, 160, 3), dtype=np.uint8), 5, axis=0)  # non-square input
    noise = rng.integers(0, 256, (5, 96, 160, 3), dtype=np.uint8)
    for kind in ("dino", "clip"):
        encoder = FrameEncoder(kind, tiny_encoders / kind, device="cpu")
        assert consistency_score(encoder(still))[0] == pytest.approx(1.0, abs=1e-5)
        assert consistency_score(encoder(noise))[0] < 0.999


def _synthetic_clip(root):
    from ex4d.cli import main

    assert main(["synth", "-o", str(root / "ex"), "--num-frames", "9", "--size", "128x128"]) == 0
    assert main(["recon", str(root / "ex" / "video.mp4"), "--depth", str(root / "ex" / "depth.npz"), "--cam", "30",
                 "--num-frames", "9", "-o", str(root / "out")]) == 0
    return root / "out"


def test_eval_cli_reports_learned_consistency(tiny_encoders, tmp_path, capsys):
    from ex4d.cli import main

    out = _synthetic_clip(tmp_path)
    report = tmp_path / "report"
    assert main(["eval", str(out / "color_30.mp4"), "--camera", str(out / "camera_30.npz"),
                 "--dino", str(tiny_encoders / "dino"), "--clip", str(tiny_encoders / "clip"), "-o", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    learned = summary["learned_consistency"]
    for key in ("subject_consistency", "background_consistency"):
        assert 0.0 <= learned[key] <= 1.0
        assert len(summary["per_frame"][key]) == 9 and summary["per_frame"][key][0] is None
    assert "subject consistency (DINO)" in (report / "report.html").read_text()
    assert "learned: subject consistency" in capsys.readouterr().out


def test_missing_encoder_folder_is_exit_2_with_the_download_command_before_any_work(tmp_path, capsys):
    from ex4d.cli import main

    out = _synthetic_clip(tmp_path)
    capsys.readouterr()
    code = main(["eval", str(out / "color_30.mp4"), "--camera", str(out / "camera_30.npz"),
                 "--dino", str(tmp_path / "nowhere"), "-o", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "hf download facebook/dino-vitb16 --local-dir" in err[0]
    assert not (tmp_path / "report" / "summary.json").exists()
