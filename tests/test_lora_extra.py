"""Extra Wan LoRAs (--lora FILE[:STRENGTH]): both key layouts, hand-computed merges, stray keys, strength 0,
the full-size LightX2V key set on the meta device, and the generation options/pipeline around them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ex4d.diffusion.weights import lora as lo
from ex4d.errors import InputError

tiny_wan = pytest.importorskip("tiny_wan")

MANIFESTS = Path(os.environ.get("EX4D_CHECKPOINT_MANIFESTS",
                                Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"))
R = 3  # LoRA rank of the hand-built files


@pytest.fixture()
def dit():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(tiny_wan.tiny_transformer_config()).eval()
    with torch.no_grad():  # the tiny model's norms start at 1 and biases at 0: make every value distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def save(path, state, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def original_layout_file(tmp_path, before):
    """An original/ComfyUI/LightX2V-style file for the tiny DiT and the expected deltas (diffusers names)."""
    inner = 24
    q_down, q_up = rand(R, inner, seed=1), rand(inner, R, seed=2)
    f_down, f_up = rand(R, inner, seed=3), rand(48, R, seed=4)  # ffn.0: 24 -> 48
    t_down, t_up = rand(R, 32, seed=5), rand(inner, R, seed=6)  # time_embedding.0: freq_dim 32 -> 24
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": q_down,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up,
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": f_down,
        "diffusion_model.blocks.1.ffn.0.lora_up.weight": f_up,
        "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(6.0),  # alpha/rank = 2
        "diffusion_model.time_embedding.0.lora_down.weight": t_down,
        "diffusion_model.time_embedding.0.lora_up.weight": t_up,
        "diffusion_model.blocks.0.self_attn.q.diff_b": rand(inner, seed=7),
        "diffusion_model.blocks.0.norm3.diff": rand(inner, seed=8),  # Wan's norm3 is diffusers' norm2
        "diffusion_model.blocks.0.norm3.diff_b": rand(inner, seed=9),
        "diffusion_model.blocks.1.cross_attn.norm_k_img.diff": rand(inner, seed=10),
        "diffusion_model.blocks.1.self_attn.norm_q.diff": rand(inner, seed=11),
        "diffusion_model.blocks.0.diff_m": rand(1, 6, inner, seed=12),
        "diffusion_model.head.diff_m": rand(1, 2, inner, seed=13),
        "diffusion_model.head.head.diff": rand(*before["proj_out.weight"].shape, seed=14),
        "diffusion_model.head.head.diff_b": rand(*before["proj_out.bias"].shape, seed=15),
        "diffusion_model.patch_embedding.diff": rand(*before["patch_embedding.weight"].shape, seed=16),
        "diffusion_model.img_emb.proj.0.diff": rand(32, seed=17),  # image_embedder.norm1 (CLIP width 32)
    }
    expected = {
        "blocks.0.attn1.to_q.weight": q_up @ q_down,  # no alpha: scale 1
        "blocks.1.ffn.net.0.proj.weight": 2.0 * (f_up @ f_down),
        "condition_embedder.time_embedder.linear_1.weight": t_up @ t_down,
        "blocks.0.attn1.to_q.bias": state["diffusion_model.blocks.0.self_attn.q.diff_b"],
        "blocks.0.norm2.weight": state["diffusion_model.blocks.0.norm3.diff"],
        "blocks.0.norm2.bias": state["diffusion_model.blocks.0.norm3.diff_b"],
        "blocks.1.attn2.norm_added_k.weight": state["diffusion_model.blocks.1.cross_attn.norm_k_img.diff"],
        "blocks.1.attn1.norm_q.weight": state["diffusion_model.blocks.1.self_attn.norm_q.diff"],
        "blocks.0.scale_shift_table": state["diffusion_model.blocks.0.diff_m"],
        "scale_shift_table": state["diffusion_model.head.diff_m"],
        "proj_out.weight": state["diffusion_model.head.head.diff"],
        "proj_out.bias": state["diffusion_model.head.head.diff_b"],
        "patch_embedding.weight": state["diffusion_model.patch_embedding.diff"],
        "condition_embedder.image_embedder.norm1.weight": state["diffusion_model.img_emb.proj.0.diff"],
    }
    return save(tmp_path / "distill.safetensors", state), expected


def assert_merged(model, before, expected, strength):
    after = model.state_dict()
    for name, value in before.items():
        if name in expected:
            want = (value.float() + strength * expected[name].float().reshape(value.shape)).to(value.dtype)
            assert torch.equal(after[name], want), name
        else:
            assert torch.equal(after[name], value), f"{name} changed"


def test_original_layout_merges_to_hand_computed_weights(dit, tmp_path):
    before = params(dit)
    path, expected = original_layout_file(tmp_path, before)
    summary = lo.merge_loras(dit, [f"{path}:0.7"])
    assert summary == [{"path": str(path), "strength": 0.7, "keys": 18, "parameters": len(expected)}]
    assert_merged(dit, before, expected, 0.7)


def test_diffusers_peft_layout_with_metadata_alpha_and_lora_bias(dit, tmp_path):
    before = params(dit)
    a, b = rand(R, 24, seed=1), rand(24, R, seed=2)
    a2, b2 = rand(R, 24, seed=3), rand(24, R, seed=4)
    bias = rand(24, seed=5)
    state = {"transformer.blocks.1.attn2.add_k_proj.lora_A.weight": a,
             "transformer.blocks.1.attn2.add_k_proj.lora_B.weight": b,
             "transformer.blocks.1.attn2.add_k_proj.lora_B.bias": bias,
             "transformer.blocks.0.attn1.to_out.0.lora_A.default.weight": a2,  # PEFT's adapter name inside
             "transformer.blocks.0.attn1.to_out.0.lora_B.default.weight": b2}
    meta = {"lora_adapter_metadata": json.dumps({"r": R, "lora_alpha": 2 * R})}  # scale 2, as diffusers saves it
    path = save(tmp_path / "style.safetensors", state, meta)
    lo.merge_loras(dit, [lo.LoraSpec(str(path), 1.0)])
    assert_merged(dit, before, {"blocks.1.attn2.add_k_proj.weight": 2.0 * (b @ a),
                                "blocks.1.attn2.add_k_proj.bias": bias,  # lora_B.bias: a full bias delta
                                "blocks.0.attn1.to_out.0.weight": 2.0 * (b2 @ a2)}, 1.0)


def test_unprefixed_diffusers_names_are_recognised(dit, tmp_path):
    before = params(dit)
    a, b = rand(R, 24, seed=1), rand(48, R, seed=2)
    path = save(tmp_path / "bare.safetensors", {"blocks.0.ffn.net.0.proj.lora_A.weight": a,
                                                "blocks.0.ffn.net.0.proj.lora_B.weight": b})
    lo.merge_loras(dit, [str(path)])
    assert_merged(dit, before, {"blocks.0.ffn.net.0.proj.weight": b @ a}, 1.0)


def test_strength_zero_leaves_every_weight_bit_identical(dit, tmp_path):
    before = params(dit)
    path, _ = original_layout_file(tmp_path, before)
    lo.merge_loras(dit, [f"{path}:0"])
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_a_key_that_applies_to_nothing_is_an_error_naming_it_and_nothing_changes(dit, tmp_path):
    before = params(dit)
    path, _ = original_layout_file(tmp_path, before)
    state = lo.read_lora_file(path)[0]
    good = dict(state)
    state["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = rand(R, 24, seed=1)  # the tiny DiT has 2 blocks
    state["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = rand(24, R, seed=2)
    bad = save(tmp_path / "bad.safetensors", state)
    with pytest.raises(InputError, match=r"2 of 20 keys apply to nothing.*blocks\.7\.self_attn\.q"):
        lo.merge_loras(dit, [str(path), str(bad)])  # the good first file is not merged either
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    # Half a pair, an unknown suffix and a wrong shape are errors too.
    half = dict(good)
    del half["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    with pytest.raises(InputError, match="blocks.0.self_attn.q.lora_down.weight"):
        lo.merge_loras(dit, [str(save(tmp_path / "half.safetensors", half))])
    with pytest.raises(InputError, match="lokr_w1"):
        lo.merge_loras(dit, [str(save(tmp_path / "lokr.safetensors",
                                      {**good, "diffusion_model.blocks.0.self_attn.q.lokr_w1": rand(2, 2, seed=3)}))])
    wrong = {**good, "diffusion_model.blocks.0.norm3.diff": rand(25, seed=4)}
    with pytest.raises(InputError, match="do not fit.*norm3.diff"):
        lo.merge_loras(dit, [str(save(tmp_path / "wrong.safetensors", wrong))])
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_merge_is_computed_in_float32_then_cast(dit, tmp_path):
    dit.to(torch.bfloat16)
    before = params(dit)
    a, b = rand(R, 24, seed=1), rand(24, R, seed=2)
    path = save(tmp_path / "x.safetensors", {"diffusion_model.blocks.0.cross_attn.v.lora_down.weight": a.bfloat16(),
                                             "diffusion_model.blocks.0.cross_attn.v.lora_up.weight": b.bfloat16()})
    lo.merge_loras(dit, [f"{path}:0.5"])
    w = before["blocks.0.attn2.to_v.weight"]
    want = (w.float() + 0.5 * (b.bfloat16().float() @ a.bfloat16().float())).to(torch.bfloat16)
    assert dit.state_dict()["blocks.0.attn2.to_v.weight"].dtype == torch.bfloat16
    assert torch.equal(dit.state_dict()["blocks.0.attn2.to_v.weight"], want)


def test_unmerged_adapter_lora_gets_the_extra_lora_in_its_base_weight(dit, tmp_path):
    from ex4d.diffusion.adapter import apply_adapter

    apply_adapter(dit, None, rank=4, merge=False)  # peft layers around the attention linears
    before = {k.replace(".base_layer.", "."): v.clone() for k, v in dit.state_dict().items()}
    a, b = rand(R, 24, seed=1), rand(24, R, seed=2)
    path = save(tmp_path / "x.safetensors", {"diffusion_model.blocks.1.self_attn.k.lora_down.weight": a,
                                             "diffusion_model.blocks.1.self_attn.k.lora_up.weight": b})
    lo.merge_loras(dit, [str(path)])
    weight = dit.get_submodule("blocks.1.attn1.to_k").base_layer.weight
    assert torch.equal(weight, before["blocks.1.attn1.to_k.weight"] + b @ a)


@pytest.mark.parametrize("text, path, strength", [
    ("a.safetensors", "a.safetensors", 1.0), ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("dir/a.safetensors:-1", "dir/a.safetensors", -1.0), ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0),
    ("C:\\loras\\a.safetensors:2", "C:\\loras\\a.safetensors", 2.0), ("odd:name.safetensors", "odd:name.safetensors", 1.0),
])
def test_lora_spec_parsing(text, path, strength):
    assert lo.parse_lora_spec(text) == lo.LoraSpec(path, strength)


def test_bad_strength_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="strength must be a number from -10 to 10"):
        lo.parse_lora_spec("a.safetensors:50")
    with pytest.raises(InputError, match="strength"):
        lo.parse_lora_spec(("a.safetensors", float("nan")))
    with pytest.raises(InputError, match="LoRA file"):
        lo.check_lora_files(lo.parse_lora_specs([str(tmp_path / "missing.safetensors")]))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot read the LoRA file"):
        lo.read_lora_file(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------------
# Full size (meta device): the predicted LightX2V key set applies in full


def lightx2v_predicted_keys(rank=64, with_diff_m=False) -> dict:
    """The extractor's rules (shared/reference/distill-lora.md) over every tensor of the original DiT."""
    dit = json.loads((MANIFESTS / "wan2.1-i2v-14b-480p_dit.json").read_text())
    keys = {}
    for name, shape in dit["tensors"].items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and math.prod(shape) >= 1_000_000:
            keys[f"diffusion_model.{module}.lora_up.weight"] = (shape[0], rank)
            keys[f"diffusion_model.{module}.lora_down.weight"] = (rank, shape[1])
        elif leaf == "weight":
            keys[f"diffusion_model.{module}.diff"] = tuple(shape)
        elif leaf == "bias":
            keys[f"diffusion_model.{module}.diff_b"] = tuple(shape)
        elif leaf == "modulation" and with_diff_m:
            keys[f"diffusion_model.{module}.diff_m"] = tuple(shape)
    return keys


@pytest.mark.skipif(not (MANIFESTS / "wan2.1-i2v-14b-480p_dit_diffusers.json").is_file(),
                    reason=f"checkpoint manifests not found in {MANIFESTS}")
@pytest.mark.parametrize("with_diff_m, total", [(False, 1749), (True, 1790)])
def test_full_size_lightx2v_key_set_applies_in_full(with_diff_m, total):
    shapes = {k: tuple(s) for k, s in json.loads((MANIFESTS / "wan2.1-i2v-14b-480p_dit_diffusers.json")
                                                 .read_text())["tensors"].items()}
    keys = lightx2v_predicted_keys(with_diff_m=with_diff_m)
    assert len(keys) == total
    suffixes = [k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in keys]
    assert (suffixes.count("lora_down"), suffixes.count("lora_up"), suffixes.count("diff"),
            suffixes.count("diff_b"), suffixes.count("diff_m")) == (487, 487, 244, 531, 41 if with_diff_m else 0)
    state = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    deltas = lo.plan_lora(state, shapes, "predicted lightx2v rank 64")
    assert sum(len(d.keys) for d in deltas) == total  # every key used once
    targets = [d.target for d in deltas]
    assert len(targets) == len(set(targets)) == 487 + 244 + 531 + (41 if with_diff_m else 0)
    # The keys diffusers' converter drops land where they belong here.
    assert {"blocks.3.norm2.weight", "blocks.3.attn2.norm_added_k.weight", "patch_embedding.weight",
            "condition_embedder.image_embedder.norm1.weight", "proj_out.weight"} <= set(targets)
    assert sum(d.kind == "lowrank" for d in deltas) == 487


# ------------------------------------------------------------------------------------------------
# Generation options and the loaded pipeline


def test_options_key_and_record_see_the_lora_files_identity(tmp_path):
    from ex4d.pipeline import GenerateOptions

    path = save(tmp_path / "d.safetensors", {"diffusion_model.head.diff_m": torch.zeros(1, 2, 24)})
    plain = GenerateOptions(device="cpu")
    one = GenerateOptions(device="cpu", loras=(f"{path}:1",))
    assert "loras" not in plain.record() and plain.pipeline_key() != one.pipeline_key()
    assert one.record()["loras"][0]["strength"] == 1.0 and one.record()["loras"][0]["size"] == path.stat().st_size
    half = GenerateOptions(device="cpu", loras=(f"{path}:0.5",))
    assert half.pipeline_key() != one.pipeline_key() and half.record() != one.record()
    key = one.pipeline_key()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file changed
    assert GenerateOptions(device="cpu", loras=(f"{path}:1",)).pipeline_key() != key
    with pytest.raises(InputError, match="LoRA file"):
        GenerateOptions(loras=(str(tmp_path / "none.safetensors"),)).validate()


def test_load_generator_merges_the_lora_before_fusion_and_a_bad_one_fails_first(tmp_path, monkeypatch):
    from ex4d.diffusion.weights import wan
    from ex4d.pipeline import GenerateOptions, load_generator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    models = tiny_wan.write_tiny_models_dir(tmp_path / "models")
    delta = rand(24, seed=3)
    path = save(tmp_path / "n.safetensors", {"diffusion_model.blocks.1.norm3.diff": delta})
    base = load_generator(GenerateOptions(models_dir=str(models), device="cpu", size="16x16"))
    merged = load_generator(GenerateOptions(models_dir=str(models), device="cpu", size="16x16",
                                            loras=(f"{path}:2",)))
    w0 = base.transformer.blocks[1].norm2.weight
    assert torch.equal(merged.transformer.blocks[1].norm2.weight, w0 + 2 * delta)
    assert torch.equal(merged.transformer.blocks[0].norm2.weight, base.transformer.blocks[0].norm2.weight)
    loads = []
    monkeypatch.setattr(wan, "load_original_layout", lambda *a, **k: loads.append(1))
    bad = save(tmp_path / "bad.safetensors", {"diffusion_model.blocks.9.norm3.diff": delta})
    with pytest.raises(InputError, match="blocks.9.norm3.diff"):
        load_generator(GenerateOptions(models_dir=str(models), device="cpu", size="16x16", loras=(str(bad),)))
    assert loads == []  # refused before any Wan weight was read


def test_batch_jobs_take_lora_lists_presets_and_shift(tmp_path):
    from ex4d.batch import check_jobs, job_generate_options, load_jobs

    (tmp_path / "loras").mkdir()
    distill = save(tmp_path / "loras" / "distill.safetensors", {"diffusion_model.head.diff_m": torch.zeros(1, 2, 24)})
    (tmp_path / "jobs.yaml").write_text(
        "defaults: {preset: fast, lora: [loras/distill.safetensors, 'loras/style.safetensors:0.5']}\n"
        "jobs:\n"
        "  - {video: a.mp4, output: out/a}\n"
        "  - {video: a.mp4, output: out/b, lora: [], steps: 6, shift: 3}\n")
    a, b = load_jobs(tmp_path / "jobs.yaml")
    assert a["lora"] == [f"{distill}:1.0", f"{tmp_path / 'loras' / 'style.safetensors'}:0.5"]
    options = job_generate_options(a)
    assert (options.steps, options.cfg, options.shift) == (4, 1.0, 5.0)
    assert [(s.path, s.strength) for s in options.loras] == [(str(distill), 1.0),
                                                            (str(tmp_path / "loras" / "style.safetensors"), 0.5)]
    options = job_generate_options(b)
    assert (options.steps, options.cfg, options.shift, options.loras) == (6, 1.0, 3.0, ())
    from ex4d.batch import job_fingerprint, job_input_files

    assert job_input_files(a)["lora_files"][0] == str(distill) and "lora_files" not in job_input_files(b)
    before = job_fingerprint(a)
    distill.write_bytes(distill.read_bytes()[:-1] + b" ")  # same name, other content: the job is not current
    assert job_fingerprint(a) != before
    problems = check_jobs([a])
    assert any("LoRA file not found" in p and "style.safetensors" in p for p in problems)
    assert not any("distill.safetensors" in p for p in problems)
    # A CSV cell separates the files by ';'.
    (tmp_path / "jobs.csv").write_text("video,output,lora,guidance\na.mp4,out/c,loras/distill.safetensors:2;x.safetensors,2\n")
    (c,) = load_jobs(tmp_path / "jobs.csv")
    assert c["lora"] == [f"{distill}:2.0", f"{tmp_path / 'x.safetensors'}:1.0"]
    assert job_generate_options(c).cfg == 2.0 and job_generate_options(c).steps == 25
