"""quarot_fx.export: a compressed-tensors checkpoint that compressed-tensors itself loads, and that
computes what the compiled model computes; what the format cannot say is refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import quarot_fx
from quarot_fx.artifact import compiled_artifacts
from quarot_fx.exporter import ExportError, export, hadamard_block, load_compressed_tensors, pack_int32
from quarot_fx.numerics.quant import dequantize_weight
from tiny_models import tiny_model, token_ids

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402

EXPORTABLE = {"r2": False, "kv_bits": 16, "lowering": "fx"}  # R2's online part and a 4-bit KV cache are refused


@given(bits=st.integers(2, 8), rows=st.integers(1, 4), cols=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_packing_equals_compressed_tensors_bit_for_bit(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), generator=g, dtype=torch.int8)
    packed = pack_int32(codes, bits)
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((rows, cols))), codes)


def test_hadamard_blocks_are_recognized_and_other_rotations_are_not():
    from quarot_fx.numerics.rotations import gsr_rotation, rotation_matrix

    full = rotation_matrix("hadamard", 96, dtype=torch.float64)  # 12 ⊗ 8: no Sylvester order
    assert torch.equal(hadamard_block(full), full * math.sqrt(96))
    assert hadamard_block(gsr_rotation(64, 16, torch.float64, "sequency")).shape == (16, 16)  # Walsh blocks
    assert hadamard_block(rotation_matrix("random", 32, dtype=torch.float64)) is None


def _compiled(arch="llama", sizes=None, **options):
    torch._dynamo.reset()
    model = tiny_model(arch, **(sizes or {}))
    compiled = quarot_fx.compile(model, **{**EXPORTABLE, **options})
    ids = token_ids(length=16)
    with quarot_fx.collect_reports() as reports, torch.no_grad():
        logits = compiled(ids).logits
    return compiled, logits, ids, reports


def _loaded_logits(path, ids):
    loaded = load_compressed_tensors(path)
    with torch.no_grad():
        return loaded, loaded(ids).logits


@pytest.mark.parametrize("arch,options", [
    ("llama", {"preset": "w4a16"}),
    ("llama", {"preset": "w4a16", "kernels": "fake", "w_group_size": 32}),
    ("qwen2", {"preset": "w4a16"}),  # q/k/v biases, rotated
    ("llama", {"preset": "w4a16", "weights": "gptq", "calibration": [token_ids(length=48, seed=s) for s in range(2)]}),
    ("llama", {"preset": "w4a16", "learn_rotations": True, "learn_steps": 3,  # the learned R1 folds into the weights
               "calibration": [token_ids(length=48, seed=s) for s in range(2)]}),
])
def test_weight_only_export_loads_in_compressed_tensors_with_our_weights_and_outputs(tmp_path, arch, options):
    compiled, logits, ids, reports = _compiled(arch, **options)
    exported = export(compiled, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    r4 = config["transform_config"]["config_groups"]["R4"]
    assert r4["type"] == "random-hadamard" and r4["apply"][0]["location"] == "input"
    loaded, theirs = _loaded_logits(tmp_path, ids)
    # compressed-tensors' decompression gives exactly our dequantized weights
    artifact = compiled_artifacts(compiled, "export", ExportError)[2][0]  # what export read
    finals = {f.weight_fqn: f for f in artifact.final_weights.values() if f.codes is not None}
    assert len(finals) == 14
    for fqn, final in finals.items():
        module = loaded.get_submodule(fqn.removesuffix(".weight"))
        assert torch.equal(module.weight.float(), dequantize_weight(*final.codes())), fqn
    torch.testing.assert_close(theirs, logits, atol=1e-5, rtol=1e-5)
    assert exported.approximations == []
    if options.get("learn_rotations"):
        assert any("learned R1" in edit for linear in reports[0].linears for edit in linear.offline)


def _rounding_apart(theirs, logits, ids) -> bool:
    """Far closer to ours than quantizing moved ours from the float model (a rounding apart, which
    4-bit activation codes downstream sometimes turn into one step)."""
    with torch.no_grad():
        float_logits = tiny_model("llama")(ids).logits
    return (theirs - logits).abs().mean() < 0.25 * (float_logits - logits).abs().mean()


@pytest.mark.parametrize("preset,qmax,fmt", [("w4a4kv4", 7, "pack-quantized"), ("w8a8kv8", 127, "int-quantized")])
def test_activation_quantized_export_matches_when_the_scales_agree(tmp_path, preset, qmax, fmt):
    # compressed-tensors' per-token scale is max|x| / (qmax + ½): our clip qmax/(qmax + ½) is the same
    # number (one division: numerics.quant.scale_divisor). No online transform: no float reordering.
    # W8A8 (8-bit weights run simulated, dequantized) then gives its bits; W4A4 sums the codes exactly,
    # as the integer kernels do, where it multiplies dequantized floats: a rounding apart.
    # A float head (the int8 head exports as codes × scales in float: the same function, another rounding).
    compiled, logits, ids, _ = _compiled(preset=preset, a_clip=qmax / (qmax + 0.5), r3=False, r4=False,
                                         kernels="fake", quantize_lm_head=False)
    export(compiled, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    assert config["config_groups"]["group_0"]["input_activations"] == {
        "num_bits": 8 if qmax == 127 else 4, "type": "int", "symmetric": True, "group_size": None,
        "strategy": "token", "dynamic": True}
    _, theirs = _loaded_logits(tmp_path, ids)
    assert torch.equal(theirs, logits) if qmax == 127 else _rounding_apart(theirs, logits, ids)


def test_online_transforms_change_only_float_rounding(tmp_path):
    # R4 runs as a butterfly here and as a matmul there: a rounding apart
    compiled, logits, ids, _ = _compiled(preset="w4a4kv4", a_clip=7 / 7.5, kernels="fake")
    export(compiled, tmp_path)
    _, theirs = _loaded_logits(tmp_path, ids)
    assert _rounding_apart(theirs, logits, ids)


def test_w4a4kv4_is_refused_by_name_then_exported_with_the_approximations_named(tmp_path):
    compiled, logits, ids, _ = _compiled(preset="w4a4kv4", r2=True, kv_bits=4, kernels="fake")
    with pytest.raises(ExportError) as refused:
        export(compiled, tmp_path)
    for name in ("kv_bits=4", "a_clip", "cross-head", "r2=False"):  # 4 heads: R2 online is H₄ ⊗ I, not Hadamard
        assert name in str(refused.value)
    compiled, logits, ids, _ = _compiled(preset="w4a4kv4", kv_bits=4, kernels="fake")
    exported = export(compiled, tmp_path, approximate=("kv_cache", "activation_scale"))
    assert len(exported.approximations) == 2 and any("R3" in note for note in exported.notes)
    record = json.loads((tmp_path / "quarot_fx_export.json").read_text())
    assert record["approximations"] == exported.approximations
    _, theirs = _loaded_logits(tmp_path, ids)
    # another model by the named approximations (on a tiny random model, about as far from the compiled
    # one as quantizing moved it): it loads and runs, and the record says what differs
    assert torch.isfinite(theirs).all() and not torch.equal(theirs, logits)


@pytest.mark.parametrize("options,head_dim", [({}, None), ({"r4_rotation": "gsr"}, 32)])
def test_r4_of_any_hadamard_order_exports_with_its_matrix(tmp_path, options, head_dim):
    sizes = {"ffn": 96}  # 12·8: a Hadamard order without a Sylvester matrix (or Walsh blocks of 32)
    compiled, logits, ids, _ = _compiled(sizes=sizes, preset="w4a16", **options)
    export(compiled, tmp_path)
    r4 = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["transform_config"]
    assert r4["config_groups"]["R4"]["head_dim"] == head_dim
    _, theirs = _loaded_logits(tmp_path, ids)  # compressed-tensors draws its own matrix: ours is loaded over it
    torch.testing.assert_close(theirs, logits, atol=1e-5, rtol=1e-5)


def test_r2_online_as_a_full_hadamard_exports(tmp_path):
    sizes = {"hidden": 48, "heads": 3, "kv_heads": 3}  # 3 heads: no H₃, so R2's online part is H₄₈
    compiled, logits, ids, _ = _compiled(sizes=sizes, preset="w4a16", r2=True)
    export(compiled, tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["transform_config"]
    assert groups["config_groups"]["R2"]["apply"][0]["targets"][0].endswith("self_attn.o_proj")
    _, theirs = _loaded_logits(tmp_path, ids)
    torch.testing.assert_close(theirs, logits, atol=1e-5, rtol=1e-5)


def test_without_online_transforms_r4_is_left_out_and_the_export_is_the_model_compiled_without_it(tmp_path):
    compiled, logits, ids, _ = _compiled(preset="w4a16")
    exported = export(compiled, tmp_path, online_transforms=False)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["transform_config"] == {} and not any("_input.weight" in k for k in _stored_keys(tmp_path))
    assert len(exported.left_out) == 2 and all(line.startswith("R4 at model.layers.") for line in exported.left_out)
    assert json.loads((tmp_path / "quarot_fx_export.json").read_text())["left_out"] == exported.left_out
    assert any("online_transforms=False" in a for a in exported.approximations)
    _, theirs = _loaded_logits(tmp_path, ids)
    with torch.no_grad():  # a second graph records the same rotations again: each is left out once
        compiled(token_ids(length=16)[:, :5], use_cache=True)
    assert len(compiled_artifacts(compiled, "export", ExportError)[2]) == 2
    assert export(compiled, tmp_path / "again", online_transforms=False).left_out == exported.left_out
    # RTN quantizes the unrotated weight exactly as a compile without R4 does
    _, without_r4, *_ = _compiled(preset="w4a16", r4=False)
    torch.testing.assert_close(theirs, without_r4, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, logits, atol=1e-3)  # and that is another model than the compiled one


def test_without_online_transforms_r2s_online_part_is_left_out_and_its_per_head_part_kept(tmp_path):
    sizes = {"hidden": 48, "heads": 3, "kv_heads": 3}  # R2's online part is H₄₈ on o_proj's input
    compiled, logits, ids, _ = _compiled(sizes=sizes, preset="w4a16", w_bits=8, r2=True, r4=False)
    exported = export(compiled, tmp_path, online_transforms=False)
    assert [line.split(" (")[0] for line in exported.left_out] == [
        f"R2 at model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["transform_config"] == {}
    _, theirs = _loaded_logits(tmp_path, ids)
    with torch.no_grad():
        float_logits = tiny_model("llama", **sizes)(ids).logits
    # 8-bit weights of the same function (R1 and R2 per head folded, nothing online): as close to the float
    # model as the compiled one is; a weight still holding the online rotation would be far off
    assert (theirs - float_logits).abs().max() < 3 * (logits - float_logits).abs().max() + 1e-4


def test_without_online_transforms_calibrated_weights_are_refused_naming_the_option(tmp_path):
    compiled, *_ = _compiled(preset="w4a16", weights="gptq", calibration=[token_ids(length=48, seed=s) for s in range(2)])
    with pytest.raises(ExportError, match="r4=False"):
        export(compiled, tmp_path, online_transforms=False)
    assert not (tmp_path / "config.json").exists()


def _stored_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        return list(weights.keys())


def test_a_rotation_that_is_not_hadamard_is_refused(tmp_path):
    compiled, *_ = _compiled(preset="w4a16", r4_rotation="random")
    with pytest.raises(ExportError, match="not a Hadamard matrix"):
        export(compiled, tmp_path)


def test_pruned_weights_export_dense_and_exact(tmp_path):
    options = {"preset": "w4a16", "weights": "rtn", "sparsity_pattern": "2:4",
               "calibration": [token_ids(length=48, seed=s) for s in range(2)]}
    compiled, logits, ids, _ = _compiled(**options)
    exported = export(compiled, tmp_path)
    assert any("dense" in note for note in exported.notes)
    _, theirs = _loaded_logits(tmp_path, ids)
    torch.testing.assert_close(theirs, logits, atol=1e-5, rtol=1e-5)


def test_bad_arguments_and_uncompiled_models_get_clear_errors(tmp_path):
    with pytest.raises(ExportError, match="no quarot-compiled graph"):
        export(tiny_model("llama"), tmp_path)
    compiled, *_ = _compiled(preset="w4a16")
    with pytest.raises(ValueError, match="format must be one of 'compressed-tensors'"):
        export(compiled, tmp_path, format="gguf")
    with pytest.raises(ValueError, match="approximate must name some of"):
        export(compiled, tmp_path, approximate=("everything",))
