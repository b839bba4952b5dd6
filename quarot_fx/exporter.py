"""Export a quarot-compiled model as a compressed-tensors checkpoint (the format vLLM and
llm-compressor share), so it can be served elsewhere.

Field names, the packing and the transform semantics come from the ``compressed-tensors`` 0.20
source (``compressors/pack_quantized``, ``transform/``, ``quantization/quant_args.py``):

* offline rotations (R1, R2's per-head part) and SmoothRot's scales are already folded into the
  weights, and the norm scales into the linears that read the norms: the norms become ones and
  the embedding and head are untied (each carries R1 its own way);
* each quantized ``nn.Linear`` is written ``pack-quantized``: the symmetric codes plus
  2^(b-1), packed 32 to ``b`` int32 words without padding bits (``weight_packed``), our float32
  scales (``weight_scale``, [out, groups]) and ``weight_shape``; strategy ``channel`` or ``group``;
  W8A8 as ``int-quantized`` instead (``weight`` holds the int8 codes), the format vLLM's int8
  GEMM reads;
* activation quantization becomes dynamic per-token symmetric ``input_activations``;
* the online R4 (and R2's online part, when it is a Hadamard matrix of the o_proj input: a head
  count without a Hadamard order, as SmolLM2's 9) becomes a ``random-hadamard`` transform on the
  linear's input (location ``input``; ``head_dim`` for block-diagonal kinds) with its ±1 matrix stored in the checkpoint
  (``<module>.R4_input.weight``), as checkpoints of randomized rotations ship theirs: loaders that
  read the matrix apply exactly ours, whatever its order (SmolLM2's 1536 = 12·128 is no Sylvester
  order). vLLM applies such transforms as a dense GEMM on any device; its ``hadamard`` type needs
  the CUDA-only hadacore kernel. A rotation that is not ±1/√n (``r4_rotation="random"``) is refused.
  With ``online_transforms=False`` (engines that apply none, e.g. vLLM's CPU build) they are left
  out instead and their linears' RTN weights quantized again in the unrotated basis.

What the format cannot say is refused, naming the option to change, unless the caller accepts the
approximation by name (``approximate=``): ``"kv_cache"`` (compressed-tensors' ``kv_cache_scheme``
holds static scales; ours are per token and head, so the exported model keeps a float cache, and
R3, which only mattered to that quantizer, is left out: it cancels in QKᵀ) and
``"activation_scale"`` (its per-token scale is max|x| / (2^(b-1) − ½): our clip ratio c equals it
only at c = (2^(b-1) − 1) / (2^(b-1) − ½)). Pruned weights are written dense (exact; compressed-
tensors 0.20 has no sparse format for quantized weights).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import compiled_artifacts
from .directories import replaced_atomically, same_directory
from .version import __version__

FORMATS = ("compressed-tensors",)
APPROXIMATIONS = ("kv_cache", "activation_scale")
WEIGHTS = "model.safetensors"
RECORD = "quarot_fx_export.json"
CT_VERSION = "0.20.0"  # the compressed-tensors release whose source these fields follow


class ExportError(ValueError):
    """The compiled model holds something the target format cannot express (the message names it)."""


@dataclass
class Exported:
    path: Path
    notes: list[str] = field(default_factory=list)  # what was written differently, and why it is exact
    approximations: list[str] = field(default_factory=list)  # accepted by name: what differs from the compiled model
    left_out: list[str] = field(default_factory=list)  # online rotations not written (online_transforms=False)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing: row element i (plus 2^(b-1)) at bits [i·b, (i+1)·b) of the
    row, least significant first, 32 elements per ``b`` int32 words; the last word may be partial."""
    rows, cols = codes.shape
    values = codes.to(torch.int64) + (1 << (bits - 1))
    if values.min() < 0 or values.max() >= 1 << bits:
        raise ExportError(f"codes outside the signed {bits}-bit range")
    padded = math.ceil(cols / 32) * 32
    values = torch.nn.functional.pad(values, (0, padded - cols)).reshape(rows, padded // 32, 32)
    start = torch.arange(32, dtype=torch.int64) * bits
    words = torch.zeros(rows, padded // 32, bits + 1, dtype=torch.int64)
    words.scatter_add_(2, (start // 32).expand_as(values), (values << (start % 32)) & 0xFFFFFFFF)
    words.scatter_add_(2, (start // 32 + 1).expand_as(values), values >> (32 - start % 32))  # spill-over bits
    words = words[..., :bits].reshape(rows, -1)[:, :math.ceil(cols * bits / 32)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def hadamard_block(matrix: torch.Tensor) -> torch.Tensor | None:
    """The ±1 block B with ``matrix`` = blockdiag(B, …, B)/√b (a Hadamard matrix of the width, or
    blocks of one: what a compressed-tensors Hadamard transform applies); None for any other matrix."""
    n = matrix.shape[0]
    for b in [d for d in range(n, 1, -1) if n % d == 0]:
        block = matrix[:b, :b] * math.sqrt(b)
        if not torch.allclose(block.abs(), torch.ones_like(block), atol=1e-9, rtol=0):
            continue
        if torch.allclose(matrix, torch.block_diag(*[block / math.sqrt(b)] * (n // b)), atol=1e-12, rtol=0):
            return block.round()
    return None


def _names_by_parameter(model) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _at(name: str, label: str) -> bool:
    """A report label (relative to the compiled frame, which may be a submodule) names ``name``."""
    return name == label or name.endswith("." + label)


def _placed(finals, names: dict[int, list[str]], problems: list[str]) -> dict:
    """Final weights by the module of the *exported* model that holds them. The compiled frame
    may be a submodule (its names lack a prefix), so a weight is found by parameter identity and,
    for a tied head, by the module path the op was recorded under."""
    placed = {}
    for final in finals:
        owners = [n.rpartition(".")[0] for n in names.get(id(final.param), []) if n.endswith(".weight")]
        matches = [m for m in owners if _at(m, final.module)]
        if len(matches) != 1:
            problems.append(f"{final.module}: cannot tell which module of the model holds {final.weight_fqn} "
                            f"(candidates {owners})")
            continue
        placed[matches[0]] = final
    return placed


def _placed_norms(artifacts, names: dict[int, list[str]], problems: list[str]) -> list[str]:
    placed = []
    for fqn, (how, param) in sorted({k: v for a in artifacts for k, v in a.folded_norms.items()}.items()):
        if how != "ones":
            problems.append(f"norm {fqn}: {how}")
        elif len(names.get(id(param), [])) != 1:
            problems.append(f"norm {fqn}: not a parameter of this model, or shared")
        else:
            placed.append(names[id(param)][0])
    return placed


def storage_format(config) -> str:
    """``int-quantized`` (one int8 per weight) for W8A8, what vLLM's int8 GEMM path reads;
    ``pack-quantized`` otherwise (sub-byte weights packed; vLLM's weight-only and W4A4/W4A8 paths)."""
    return "int-quantized" if config.w_bits == 8 and config.a_bits < 16 else "pack-quantized"


def _module_named(label: str, modules: dict) -> str | None:
    """The model's module a report label names (labels are relative to the compiled frame)."""
    found = [name for name in modules if _at(name, label)]
    return found[0] if len(found) == 1 else None


def _transforms(online, modules: dict, problems: list[str], notes: list[str]) -> tuple[dict, dict]:
    """(transform_config groups, {key: ±1 matrix}) for the online rotations: R4 and R2's online
    part as ``random-hadamard`` transforms on their linear's input, matrices stored in the
    checkpoint, so any Hadamard order exports and loaders that read the matrix (vLLM: a dense GEMM
    on every device) apply exactly ours; R3 left out; anything not ±1/√n refused."""
    from quarot_fx.passes.matrices import build

    groups: dict[tuple, list[str]] = {}
    blocks: dict[tuple, torch.Tensor] = {}
    r3 = [rotation.where for rotation in online if rotation.region == "R3"]
    if r3:  # with kv_bits < 16 the KV refusal (or its accepted approximation) says why
        notes.append(f"R3 left out at {len(r3)} attention(s) ({r3[0]}, …): with a float KV cache it cancels in "
                     "QKᵀ (the same function; float rounding differs)")
    for rotation in online:
        if rotation.region == "R3":
            continue
        region, option = rotation.region, rotation.region.lower()
        matrix = build(rotation.matrix)
        if matrix.shape[0] != rotation.width:
            problems.append(f"{region} at {rotation.where} zero-pads {rotation.width}→{matrix.shape[0]}: a transform "
                            f"keeps the width; compile with an {option}_rotation of that order, or {option}=False")
            continue
        block = hadamard_block(matrix)
        where = _module_named(rotation.where, modules)
        if where is None:
            problems.append(f"{region} at {rotation.where}: no single module of the model has that name")
            continue
        if block is None:  # e.g. R2's cross-head part H_heads ⊗ I: it mixes heads, entries 0 and ±1/√heads
            problems.append(f"{region} at {rotation.where} is {rotation.matrix.describe()}, not a Hadamard matrix (or "
                            "blocks of one): compressed-tensors' Hadamard transforms apply ±1/√n matrices only; "
                            f"compile with {option}=False" + ("" if region == "R2" else ", or r4_rotation='hadamard'"))
            continue
        key = (region, block.shape[0], None if block.shape[0] == matrix.shape[0] else block.shape[0])
        groups.setdefault(key, []).append(where)
        blocks[key] = block
    config_groups, stored = {}, {}
    for (region, size, head_dim), targets in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        name = region if sum(k[0] == region for k in groups) == 1 else f"{region}_{size}"
        config_groups[name] = {
            "type": "random-hadamard", "randomize": False, "requires_grad": False, "head_dim": head_dim,
            "precision": "torch.float32",
            "apply": [{"targets": sorted(targets), "location": "input", "inverse": False, "ignore": []}],
        }
        for target in targets:
            stored[f"{target}.{name}_input.weight"] = blocks[region, size, head_dim]
    return config_groups, stored


def _left_out(online, modules: dict, finals: dict, problems: list[str]) -> tuple[list[str], set[str]]:
    """``online_transforms=False``: the online R2/R4 rotations left out (one line each) and the
    modules whose weights are written re-quantized without them. Only a weight the compiler can
    quantize again in the unrotated basis (RTN, rotation and quantization in one phase) can lose
    its rotation; a calibrated one (GPTQ/OBR solved it against the rotated inputs' Hessian) is
    refused, naming the compile option that leaves the rotation out from the start."""
    left_out, requantized, seen = [], set(), set()
    for rotation in online:  # each graph of the model (prefill, decode) records its own
        if rotation.region == "R3" or (rotation.region, rotation.where) in seen:
            continue
        seen.add((rotation.region, rotation.where))
        option = rotation.region.lower()
        where = _module_named(rotation.where, modules)
        final = finals.get(where)
        if where is None or final is None:
            problems.append(f"{rotation.region} at {rotation.where}: no single quantized module of the model has that "
                            "name")
        elif final.offline_codes is None:
            problems.append(f"online_transforms=False: {where}'s weight was quantized in the basis of its online "
                            f"{rotation.region} (calibrated, e.g. GPTQ/OBR, or folded in an earlier phase) and cannot "
                            f"be quantized again without it; compile with {option}=False")
        else:
            left_out.append(f"{rotation.region} at {where} ({rotation.matrix.describe()}): weight quantized again "
                            "without it")
            requantized.add(where)
    return left_out, requantized


def _check_config(config, artifacts, accepted: set, problems: list[str]) -> None:
    expanded = sum(a.expanded_dims for a in artifacts)
    if config.w_bits >= 16:
        problems.append("w_bits=16: pack-quantized needs quantized weights (2..8 bits)")
    if expanded:
        problems.append(f"expand: the residual stream is {expanded} dimensions wider than the "
                        "model class; compile with expand=0 (and a width that has a Hadamard order)")
    if any(a.explicit_inverses for a in artifacts):
        problems.append("R1 needed explicit inverse rotations at run time (see explain()); the model class has no "
                        "place for them")
    if config.kv_bits < 16 and "kv_cache" not in accepted:
        problems.append(f"kv_bits={config.kv_bits}: compressed-tensors' kv_cache_scheme has static scales, "
                        "quarot-fx quantizes per token and head; compile with kv_bits=16, or pass "
                        "approximate=('kv_cache',) to export a float KV cache")
    if _activation_scales_differ(config) and "activation_scale" not in accepted:
        qmax = 2 ** (config.a_bits - 1) - 1
        clip = "searched per input (gbs)" if config.a_clip == "gbs" else f"{config.activation_clip:g}"
        problems.append(f"a_clip: compressed-tensors scales a token by max|x| / {qmax + 0.5:g} (clip "
                        f"{qmax / (qmax + 0.5):.6g} in quarot-fx terms), this model used clip {clip}; compile with "
                        f"a_clip={qmax / (qmax + 0.5)!r}, or pass approximate=('activation_scale',)")


def _activation_scales_differ(config) -> bool:
    """Our per-token scales are not compressed-tensors' max|x| / (qmax + ½)."""
    if config.a_bits >= 16:
        return False
    qmax = 2 ** (config.a_bits - 1) - 1
    return config.a_clip == "gbs" or abs(config.activation_clip - qmax / (qmax + 0.5)) > 1e-9


def _tensors(model, config, finals: dict, norms: list[str], transform_weights: dict,
             requantized: set = frozenset()) -> tuple[dict, list, int | None]:
    """(the checkpoint's tensors, the quantized modules, their group size): the model's state dict
    with every edited weight replaced by what the compiled graph holds (``requantized``: quantized
    without their online rotations instead)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    quantized, group_sizes = [], set()
    for name, final in sorted(finals.items()):
        if final.bias is not None:
            state[f"{name}.bias"] = final.bias.detach()
        if final.codes is None:
            state[f"{name}.weight"] = final.weight.detach()
            continue
        codes, scales = (final.offline_codes if name in requantized else final.codes)()
        state.pop(f"{name}.weight", None)
        if storage_format(config) == "int-quantized":
            state[f"{name}.weight"] = codes.to(torch.int8)
        else:
            state[f"{name}.weight_packed"] = pack_int32(codes, final.bits)
            state[f"{name}.weight_shape"] = torch.tensor(list(codes.shape))
        state[f"{name}.weight_scale"] = scales.float()
        quantized.append(name)
        group_sizes.add(final.group_size)
    for fqn in norms:
        state[fqn] = torch.ones_like(state[fqn])
    for key, block in transform_weights.items():  # ±1: exact in float16, half the bytes
        state[key] = block.to(torch.float16)
    if len(group_sizes) > 1:
        raise ExportError(f"cannot export: linears quantized with different groups {sorted(group_sizes)}")
    return {k: v.contiguous().clone() for k, v in state.items()}, quantized, next(iter(group_sizes), None)


def _quantization_config(config, group: int | None, ignore: list[str], transforms: dict) -> dict:
    """config.json's ``quantization_config``, in compressed-tensors 0.20's field names."""
    fmt = storage_format(config)
    weights = {"num_bits": config.w_bits, "type": "int", "symmetric": True, "group_size": group,
               "strategy": "group" if group else "channel", "dynamic": False}
    activations = None if config.a_bits >= 16 else {
        "num_bits": config.a_bits, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
        "dynamic": True}
    return {
        "quant_method": "compressed-tensors", "version": CT_VERSION, "format": fmt,
        "quantization_status": "compressed", "global_compression_ratio": None, "kv_cache_scheme": None,
        "sparsity_config": {}, "moe_sparsity_config": None,
        # the format per group too: the loader would infer int-quantized for W4A4
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore, "transform_config": {"config_groups": transforms} if transforms else {},
    }


def _refuse_to_overwrite(model, out: Path, overwrite: bool):
    """What ``replaced_atomically`` asks before replacing a non-empty ``out``: never the base
    model's own directory; anything else only with ``overwrite``."""
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    if base and os.path.isdir(base) and same_directory(base, out):
        raise FileExistsError(f"export: {out} is the directory of the base model itself; exporting there would "
                              "overwrite its config.json and model.safetensors. Choose another directory")

    def may_replace(existing: Path):
        if overwrite:
            return None
        return (f"export: {existing} is not empty; choose a new or empty directory, or pass overwrite=True "
                "(CLI: --overwrite) to replace it")
    return may_replace


def export(compiled_model, path, format: str = "compressed-tensors", *, approximate=(), tokenizer=None,
           overwrite: bool = False, online_transforms: bool = True) -> Exported:
    """Write ``compiled_model`` (quarot-compiled and called once) to the directory ``path`` as a
    Hugging Face checkpoint in ``format``; see the module doc for what is written and refused.
    The directory is written atomically; a non-empty one is replaced only with ``overwrite``, and
    the base model's own directory never.

    ``online_transforms=False`` writes only what folds into the weights (R1, R2's per-head part,
    SmoothRot) for engines that apply no online transform (vLLM's CPU build): R2's online part and
    R4 are left out, their linears quantized again without them (RTN weights only; see
    ``Exported.left_out``). The export then computes a different function than the compiled model,
    and its record says so."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}; got {format!r}")
    accepted = set(approximate)
    if accepted - set(APPROXIMATIONS):
        raise ValueError(f"approximate must name some of {', '.join(map(repr, APPROXIMATIONS))}; "
                         f"got {sorted(accepted - set(APPROXIMATIONS))}")
    model, config, artifacts = compiled_artifacts(compiled_model, "export", ExportError)
    may_replace = _refuse_to_overwrite(model, Path(path), overwrite)
    problems: list[str] = []
    notes: list[str] = []
    _check_config(config, artifacts, accepted, problems)
    modules = dict(model.named_modules())
    names = _names_by_parameter(model)
    finals = _placed([f for a in artifacts for f in a.final_weights.values()], names, problems)
    norms = _placed_norms(artifacts, names, problems)
    online = [o for a in artifacts for o in a.online]
    left_out, requantized = [], set()
    if not online_transforms:
        left_out, requantized = _left_out(online, modules, finals, problems)
        online = [o for o in online if o.region == "R3"]
    transforms, transform_weights = _transforms(online, modules, problems, notes)
    for name, final in sorted(finals.items()):
        if final.codes is not None and not isinstance(modules[name], torch.nn.Linear):
            problems.append(f"{name} is a {type(modules[name]).__name__}: compressed-tensors quantizes nn.Linear only")
    if problems:
        raise ExportError(f"cannot export to {format}:\n  - " + "\n  - ".join(problems))

    state, quantized, group = _tensors(model, config, finals, norms, transform_weights, requantized)
    if config.prunes:
        notes.append("pruned weights are written dense (compressed-tensors 0.20 has no sparse format for "
                     "quantized weights): the same numbers, 4 bits each")
    ignore = sorted({n for n, m in modules.items() if isinstance(m, torch.nn.Linear)} - set(quantized))
    quantization_config = _quantization_config(config, group, ignore, transforms)

    approximations = []
    if "kv_cache" in accepted and config.kv_bits < 16:
        approximations.append(f"KV cache in float (compiled: {config.kv_bits}-bit per token and head)")
    if "activation_scale" in accepted and _activation_scales_differ(config):
        approximations.append("per-token activation scales max|x|/(2^(b-1) − ½) (compiled: clip "
                              f"{'gbs' if config.a_clip == 'gbs' else f'{config.activation_clip:g}'})")
    if left_out:
        approximations.append(f"online rotations left out at {len(left_out)} linear(s) (online_transforms=False): "
                              "those weights quantized again without them, their inputs unrotated")
    record = {"quarot_fx_version": __version__, "format": format, "options": {
        k: v for k, v in config.to_options().items() if k not in ("calibration", "calibrated")},
        "approximations": approximations, "left_out": left_out, "notes": notes, "quantized_linears": len(quantized),
        "format_of_weights": storage_format(config)}
    hf_config = copy.deepcopy(model.config)
    hf_config.tie_word_embeddings = False  # R1 reaches the embedding and the head differently
    if not getattr(hf_config, "architectures", None):  # e.g. a config read from GGUF: loaders look for it
        hf_config.architectures = [type(model).__name__]
    hf_config.quantization_config = quantization_config
    out = Path(path)
    with replaced_atomically(out, may_replace) as scratch:
        hf_config.save_pretrained(scratch)
        save_file(state, str(scratch / WEIGHTS), metadata={"format": "pt"})  # cloned: tied storage untied
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        (scratch / RECORD).write_text(json.dumps(record, indent=1, default=str))
    return Exported(out, notes, approximations, left_out)


def load_compressed_tensors(path, **kwargs):
    """The exported checkpoint as compressed-tensors runs it: transformers' loader (weights
    decompressed on the first call, activations fake-quantized per token), then the transforms
    of ``transform_config`` (transformers 5.24 does not apply them itself)."""
    try:
        from compressed_tensors.transform import TransformConfig, apply_transform_config
    except ImportError as error:
        raise ImportError("loading a compressed-tensors checkpoint needs it: pip install "
                          "'quarot-fx[export]'") from error
    from transformers import AutoModelForCausalLM

    from safetensors import safe_open

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    transforms = json.loads((Path(path) / "config.json").read_text())["quantization_config"].get("transform_config")
    if not transforms:
        return model
    apply_transform_config(model, TransformConfig.model_validate(transforms))
    # the matrices are in the checkpoint (a random-hadamard factory draws its own): load them
    params = dict(model.named_parameters(remove_duplicate=False))
    with safe_open(str(Path(path) / WEIGHTS), "pt") as weights, torch.no_grad():
        for key in weights.keys():
            if key.endswith("_input.weight") and key in params:
                params[key].copy_(weights.get_tensor(key))
    return model
