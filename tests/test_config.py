import pytest

from quarot_fx import PRESETS, QuaRotConfig


def test_defaults_are_w4a4kv4_hadamard():
    cfg = QuaRotConfig()
    assert (cfg.w_bits, cfg.a_bits, cfg.kv_bits, cfg.rotation) == (4, 4, 4, "hadamard")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_set_bits(preset):
    cfg = QuaRotConfig.from_options({"preset": preset})
    assert {k: getattr(cfg, k) for k in ("w_bits", "a_bits", "kv_bits")} == PRESETS[preset]


def test_explicit_keys_override_preset_and_round_trip():
    cfg = QuaRotConfig.from_options({"preset": "w4a4kv4", "kv_bits": 8})
    assert (cfg.w_bits, cfg.kv_bits) == (4, 8)
    assert QuaRotConfig.from_options(cfg.to_options()) == cfg
    assert cfg.replace(rotation="gsr").rotation == "gsr"


def test_fp_preset_quantizes_nothing():
    cfg = QuaRotConfig.from_options({"preset": "fp"})
    assert not cfg.quantizes and cfg.rotates


@pytest.mark.parametrize("options,pattern", [
    ({"w_bit": 4}, r"unknown quarot option\(s\) 'w_bit'; allowed keys: preset, rotation, w_bits"),
    ({"rotation": "fft"}, r"rotation must be one of 'hadamard', 'randomized_hadamard', 'gsr', 'random', 'none'; got 'fft'"),
    ({"w_bits": 1}, r"w_bits must be an integer in 2..8, or 16"),
    ({"a_bits": 4.0}, r"a_bits must be an integer"),
    ({"kv_bits": True}, r"kv_bits must be an integer"),
    ({"preset": "w3"}, r"preset must be one of 'w4a4kv4', 'w8a8kv8', 'w6a6kv6', 'w3a3kv3', 'w4a16', 'fp'"),
    ({"lowering": "aot"}, r"lowering must be one of 'inductor', 'fx'"),
    ({"wrapper": "c"}, r"wrapper must be one of 'python', 'cpp'"),
    ({"wrapper": "cpp", "lowering": "fx"}, r"'wrapper'='cpp' is Inductor's C\+\+ wrapper and needs lowering='inductor'"),
    ({"prefill_attention": "int4"}, r"prefill_attention must be one of 'float', 'int8'; got 'int4'"),
    ({"prefill_attention": "int8", "preset": "w8a8kv8"}, r"'prefill_attention'='int8' .* needs kv_bits ≤ 4 and "
                                                          r"kv_cache='packed' \(got kv_bits=8"),
    ({"prefill_attention": "int8", "kv_cache": "float"}, r"'prefill_attention'='int8' .*kv_cache='float'"),
    ({"gsr_group_size": 48}, r"gsr_group_size must be None or a power of two"),
    ({"r2": "yes"}, r"r2 must be True or False"),
    ({"seed": -1}, r"seed must be a non-negative integer"),
    ({"weights": "awq"}, r"weights must be one of 'rtn', 'gptq'"),
    ({"a_clip": 1.5}, r"a_clip must be None, a number in \(0, 1\] or 'gbs'"),
    ({"w_group_size": 0}, r"w_group_size must be None or a positive integer"),
])
def test_bad_options_name_the_key_and_allowed_values(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        QuaRotConfig.from_options(options)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="w_bits"):
        QuaRotConfig(w_bits=9)
