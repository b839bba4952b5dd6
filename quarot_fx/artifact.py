"""Quantize once, load anywhere: ``save`` what calibration produced, ``load`` it without calibrating.

A compiled model is Dynamo graphs plus constants; the graphs cannot be revived without tracing the
model again, but everything *slow* in them comes from calibration: GPTQ/OBR codes and scales,
SmoothRot's channel maxima, GBS clips. ``save`` writes those (by parameter name, so they survive
the process) with the options and a fingerprint of the base model; ``load`` checks the model,
and compiles it with ``calibrated=`` the saved products, so the passes take them instead of
calibrating (learned rotations included: ``load`` never learns again). The rewrite (analysis,
rotations folded into weights, RTN, packing) reruns, in
seconds, deterministically: the loaded model's outputs equal the saved one's bit for bit.

Layout of a saved directory:

* ``manifest.json``: ``format``, ``format_version``, quarot-fx version, options, the calibration
  fingerprint, the base model (source, and per parameter shape, dtype and a float64 checksum),
  the clips, what each weight is, and the sha256 of every other file (``files``);
* ``calibrated.safetensors``: ``weight/<fqn>/codes`` (codes of ≤ 4 bits packed two per byte, the
  ``pack_int4`` layout; int8 beyond), ``weight/<fqn>/scales``, ``channel_max/<fqn>``,
  ``rotation/<name>`` (a learned R1/R2, float64, checked orthogonal on load); its metadata
  repeats the options and the clips.

An artifact cannot lie: ``save`` writes a temporary directory and renames it into place (an
interrupted save leaves the old artifact or nothing); ``load`` refuses a file whose sha256 differs
from the manifest's, manifest options or clips that differ from the copy inside the hashed
tensors file, and codes that do not fit the options (their bits, groups and sparsity are read
from the codes themselves), naming the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .calibrated import ArtifactError, Calibrated
from .numerics.stiefel import orthogonality_error
from .version import __version__

FORMAT = "quarot-fx calibrated artifact"
FORMAT_VERSION = 2  # 2: sha256 of the files, options and clips repeated in the tensors' metadata
MANIFEST = "manifest.json"
TENSORS = "calibrated.safetensors"


def _builds_of(model: torch.nn.Module) -> list:
    """(graph, build) of every build made for this model's parameters. One Dynamo graph serves
    models of the same class (dynamic shapes make that common), with a build per model."""
    from .backend import live_graphs

    params = {id(t) for t in (*model.parameters(), *model.buffers())}
    return [(g, b) for g in live_graphs() for b in list(g.builds.values())
            if b.bound and all(id(t) in params for _, t, _ in b.bound)]


def compiled_artifacts(compiled_model, verb: str, error: type[ValueError]) -> tuple:
    """(model, config, every build's CompiledArtifact) of a quarot-compiled model, for ``save`` and ``export``:
    refused if it was never called (compilation is lazy) or compiled with different options."""
    model = getattr(compiled_model, "_orig_mod", compiled_model)
    builds = _builds_of(model)
    if not builds:
        raise error(f"quarot_fx.{verb}: this model has no quarot-compiled graph yet; compile it with "
                    "backend='quarot' and call it once (compilation happens on the first call)")
    configs = [g.config for g, _ in builds]
    if any(c != configs[0] for c in configs):
        raise error(f"quarot_fx.{verb}: the model was compiled with different options in this process; "
                    f"{verb} from a process that compiled it once")
    return model, configs[0], [b.artifact for _, b in builds]


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Per parameter: shape, dtype and a float64 checksum (Σ w and Σ w·position mod a prime)."""
    result = {}
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1).double()
        ramp = torch.arange(flat.numel(), dtype=torch.float64) % 9973 + 1
        result[name] = [list(p.shape), str(p.dtype).removeprefix("torch."), float(flat.sum()), float((flat * ramp).sum())]
    return result


def _codes_storage(w_bits: int) -> str:
    return "int4" if w_bits <= 4 else "int8"


def save(compiled_model, path, source: str | None = None) -> Path:
    """Write what calibration produced for ``compiled_model`` (already called at least once:
    compilation is lazy) to the directory ``path``, atomically; see the module doc. ``path`` may
    be empty, absent or an earlier artifact (replaced); any other directory is refused.
    ``source``: how ``load`` finds the base model again (default: the model config's ``_name_or_path``)."""
    from safetensors.torch import save_file

    from .kernels import pack_int4

    from .directories import replaced_atomically, sha256

    model, config, artifacts = compiled_artifacts(compiled_model, "save", ArtifactError)
    calibrated = Calibrated(config.calibration_id())
    for artifact in artifacts:
        calibrated.merge(artifact.calibrated)
    storage = _codes_storage(config.w_bits)
    tensors = {}
    for fqn, (codes, scales) in calibrated.weights.items():
        codes = codes.to(torch.int8).contiguous()
        tensors[f"weight/{fqn}/codes"] = pack_int4(codes) if storage == "int4" else codes
        tensors[f"weight/{fqn}/scales"] = scales.float().contiguous()
    for fqn, maxima in calibrated.channel_max.items():
        tensors[f"channel_max/{fqn}"] = maxima.double().contiguous()
    for name, matrix in calibrated.rotations.items():
        tensors[f"rotation/{name}"] = matrix.double().contiguous()
    options = {k: v for k, v in config.to_options().items() if k not in ("calibration", "calibrated")}
    clips = [[site, what, clip] for (site, what), clip in calibrated.clips.items()]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "quarot_fx_version": __version__,
        "options": options, "calibration_fingerprint": calibrated.fingerprint,
        "source": source or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "codes": storage,
        "weights": {fqn: list(codes.shape) for fqn, (codes, _) in calibrated.weights.items()},
        "clips": clips,
        "model": model_fingerprint(model),
    }
    metadata = {"options": json.dumps(options, sort_keys=True), "clips": json.dumps(clips), "codes": storage}

    def replaceable(existing: Path):
        if (existing / MANIFEST).is_file():
            return None
        return (f"quarot_fx.save: {existing} is a non-empty directory that holds no quarot-fx artifact; "
                "save to a new or empty directory (an earlier artifact there is replaced)")

    path = Path(path)
    with replaced_atomically(path, replaceable) as scratch:
        save_file(tensors, str(scratch / TENSORS), metadata=metadata)
        manifest["files"] = {TENSORS: sha256(scratch / TENSORS)}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


# The manifest's keys and the types load relies on (a hand-edited manifest fails here, by name).
MANIFEST_FIELDS = {"format": str, "format_version": int, "options": dict, "weights": dict, "clips": list,
                   "model": dict, "files": dict, "codes": str}


def _check_manifest(path: Path, manifest) -> None:
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path / MANIFEST} holds a {type(manifest).__name__}, not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST} is not a {FORMAT} (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')!r}; this quarot-fx reads "
                            f"version {FORMAT_VERSION} only: re-save it with this version")
    for key, kind in MANIFEST_FIELDS.items():
        if key not in manifest:
            raise ArtifactError(f"{path / MANIFEST} has no {key!r} field (edited or truncated?)")
        if not isinstance(manifest[key], kind):
            raise ArtifactError(f"{path / MANIFEST}: {key!r} must be a {kind.__name__}, not "
                                f"{type(manifest[key]).__name__}")
    if TENSORS not in manifest["files"]:
        raise ArtifactError(f"{path / MANIFEST}: 'files' has no sha256 of {TENSORS}")


def read_manifest(path) -> dict:
    """The manifest of the artifact at ``path``, its fields and their types checked."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as error:
        raise ArtifactError(f"{path} is not a quarot-fx artifact: no {MANIFEST}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON (truncated?): {error}") from error
    _check_manifest(path, manifest)
    return manifest


def _read(path: Path) -> tuple[dict, dict, dict]:
    """(manifest, tensors, the tensors file's metadata), each file checked against its sha256."""
    from safetensors import SafetensorError, safe_open

    from .directories import sha256

    manifest = read_manifest(path)
    for name, digest in manifest["files"].items():
        try:
            found = sha256(path / name)
        except OSError as error:
            raise ArtifactError(f"{path / name} cannot be read: {error}") from error
        if found != digest:
            raise ArtifactError(f"{path / name} is not the file this artifact was saved with (sha256 {found[:12]}…, "
                                f"the manifest says {str(digest)[:12]}…): replaced, edited or truncated")
    try:
        with safe_open(str(path / TENSORS), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ArtifactError(f"{path / TENSORS} cannot be read (truncated or corrupt?): {error}") from error
    return manifest, tensors, metadata


def _check_against_tensors(path: Path, manifest: dict, metadata: dict) -> None:
    """The manifest's options, clips and code storage against the copy inside the hashed tensors
    file: an edited manifest names the field that differs."""
    try:
        options, clips = json.loads(metadata["options"]), json.loads(metadata["clips"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path / TENSORS} lacks the options it was saved with") from error
    for key in sorted(set(options) | set(manifest["options"])):
        if options.get(key) != manifest["options"].get(key):
            raise ArtifactError(f"{path / MANIFEST}: option {key!r} is {manifest['options'].get(key)!r}, but the "
                                f"saved codes were made with {options.get(key)!r} (the manifest was edited)")
    if clips != manifest["clips"]:
        raise ArtifactError(f"{path / MANIFEST}: 'clips' differ from those saved with the codes (the manifest was edited)")
    if metadata.get("codes") != manifest["codes"]:
        raise ArtifactError(f"{path / MANIFEST}: 'codes' is {manifest['codes']!r}, the tensors hold {metadata.get('codes')!r}")


def _check_codes(fqn: str, codes: torch.Tensor, scales: torch.Tensor, config) -> None:
    """The options that shaped a weight's codes, read from the codes: their bit width (the codes
    fit it and need it), their groups (columns of scales) and their sparsity (at least the zeros
    it asks for; dense codes can be mostly zero too, so the other way is left to the hashed
    options)."""
    bits, (rows, columns) = config.w_bits, codes.shape
    top = 1 << (bits - 1)
    low, high = int(codes.min()), int(codes.max())
    if low < -top or high > top - 1:
        raise ArtifactError(f"option 'w_bits' = {bits} does not fit the codes of {fqn} (they span {low}..{high})")
    if bits > 2 and max(-low, high) <= top // 2:
        raise ArtifactError(f"option 'w_bits' = {bits} does not fit the codes of {fqn}: they span {low}..{high}, "
                            f"{bits - 1} bits' range")
    groups = 1 if config.w_group_size is None else -(-columns // config.w_group_size)
    if scales.shape != (rows, groups):
        raise ArtifactError(f"option 'w_group_size' = {config.w_group_size} does not fit {fqn}: its scales are "
                            f"{tuple(scales.shape)} for {columns} input columns")
    zeros = float((codes == 0).float().mean())
    if config.prunes and zeros < config.pruned_fraction - 1e-3:
        raise ArtifactError(f"option 'sparsity' ({config.sparsity_pattern}, {config.pruned_fraction:.0%}) does not fit "
                            f"{fqn}: only {zeros:.0%} of its codes are zero")


def _check_model(model: torch.nn.Module, expected: dict) -> None:
    found = model_fingerprint(model)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ArtifactError(f"the model does not match the artifact: parameters missing {missing[:3]}, "
                            f"unexpected {extra[:3]}")
    for name, (shape, dtype, total, weighted) in expected.items():
        f_shape, f_dtype, f_total, f_weighted = found[name]
        if f_shape != shape or f_dtype != dtype:
            raise ArtifactError(f"the model does not match the artifact: {name} is {f_dtype} {f_shape}, "
                                f"the artifact was saved from {dtype} {shape}")
        scale = max(1.0, abs(total), abs(weighted))
        if abs(f_total - total) > 1e-6 * scale or abs(f_weighted - weighted) > 1e-6 * scale:
            raise ArtifactError(f"the model does not match the artifact: the values of {name} differ from the "
                                "model it was saved from (another checkpoint or fine-tune?)")


def read_calibrated(path) -> tuple[dict, Calibrated]:
    """(manifest, what calibration produced) of the artifact at ``path``, every check of the
    module doc passed: the one reader of saved codes (``load`` and the benchmarks use it)."""
    from .config import QuaRotConfig
    from .kernels import unpack_int4

    path = Path(path)
    manifest, tensors, metadata = _read(path)
    _check_against_tensors(path, manifest, metadata)
    try:
        saved = QuaRotConfig.from_options({**manifest["options"], "calibrated": Calibrated()})
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{path / MANIFEST}: its options are not valid: {error}") from error
    calibrated = Calibrated(manifest.get("calibration_fingerprint"))
    for fqn, shape in manifest["weights"].items():
        try:
            stored, scales = tensors[f"weight/{fqn}/codes"], tensors[f"weight/{fqn}/scales"]
        except KeyError as error:
            raise ArtifactError(f"{path / TENSORS} lacks the tensors of {fqn}") from error
        codes = unpack_int4(stored, shape[-1]) if manifest["codes"] == "int4" else stored
        _check_codes(fqn, codes, scales, saved)
        calibrated.weights[fqn] = (codes, scales)
    for key, tensor in tensors.items():
        if key.startswith("channel_max/"):
            calibrated.channel_max[key.removeprefix("channel_max/")] = tensor
        if key.startswith("rotation/"):
            error = orthogonality_error(tensor.double()) if tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1] \
                else math.inf
            if not error <= 1e-5:
                raise ArtifactError(f"{path / TENSORS}: the learned rotation {key.removeprefix('rotation/')!r} is not "
                                    f"an orthogonal matrix (max |RᵀR − I| = {error:.2e})")
            calibrated.rotations[key.removeprefix("rotation/")] = tensor
    calibrated.clips = {(site, what): clip for site, what, clip in manifest["clips"]}
    return manifest, calibrated


def load(path, model: torch.nn.Module | None = None, **overrides):
    """A quarot-compiled model from a directory written by :func:`save`, with no calibration.

    ``model``: the base model it was saved from (default: load the manifest's ``source``).
    ``overrides``: options that do not change the numbers (``lowering``, ``wrapper``, ``int_gemm``,
    ``resident_weights``, ``kv_cache``)."""
    from .backend import compile

    path = Path(path)
    manifest, calibrated = read_calibrated(path)
    allowed = {"lowering", "wrapper", "int_gemm", "resident_weights", "kv_cache"}
    if set(overrides) - allowed:
        raise ArtifactError(f"quarot_fx.load: {sorted(set(overrides) - allowed)} would change the saved model; "
                            f"only {sorted(allowed)} may be overridden")
    if model is None:
        source = manifest.get("source")
        if not source:
            raise ArtifactError(f"{path} does not record where its base model came from; pass model=")
        from quarot_fx.tools.models import load_model  # only here: importing quarot_fx imports no tools

        model = load_model(source)[0]
    _check_model(model, manifest["model"])
    return compile(model, **{**manifest["options"], **overrides, "calibrated": calibrated})
