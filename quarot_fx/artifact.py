"""Quantize once, load anywhere: ``save`` what calibration produced, ``load`` it without calibrating.

A compiled model is Dynamo graphs plus constants; the graphs cannot be revived without tracing the
model again, but everything *slow* in them comes from calibration: GPTQ/OBR codes and scales,
SmoothRot's channel maxima, GBS clips. ``save`` writes those (by parameter name, so they survive
the process) with the options and a fingerprint of the base model; ``load`` checks the model,
and compiles it with ``calibrated=`` the saved products, so the passes take them instead of
calibrating. The rewrite (analysis, rotations folded into weights, RTN, packing) reruns, in
seconds, deterministically: the loaded model's outputs equal the saved one's bit for bit.

Layout of a saved directory:

* ``manifest.json``: ``format``, ``format_version``, quarot-fx version, options, the calibration
  fingerprint, the base model (source, and per parameter shape, dtype and a float64 checksum),
  the clips and what each weight is;
* ``calibrated.safetensors``: ``weight/<fqn>/codes`` (int4 codes packed two per byte, the
  ``pack_int4`` layout), ``weight/<fqn>/scales``, ``channel_max/<fqn>``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "quarot-fx calibrated artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "calibrated.safetensors"


class ArtifactError(ValueError):
    """A saved artifact that cannot be loaded as it is (never a silently different model)."""


@dataclass
class Calibrated:
    """What calibration produced, keyed by parameter name (stable across processes)."""

    fingerprint: str | None = None  # of the calibration tokens
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # fqn → (codes, scales)
    channel_max: dict[str, torch.Tensor] = field(default_factory=dict)  # down-projection weight fqn → max |x_j|
    clips: dict[tuple[str, str], float] = field(default_factory=dict)  # (site, what) → clip

    def __str__(self) -> str:
        return (f"{len(self.weights)} calibrated weights, {len(self.channel_max)} SmoothRot sites, "
                f"{len(self.clips)} clips")

    def merge(self, other: Calibrated) -> None:
        if other.fingerprint is not None:
            if self.fingerprint not in (None, other.fingerprint):
                raise ArtifactError("the compiled graphs were calibrated on different data")
            self.fingerprint = other.fingerprint
        self.weights.update(other.weights)
        self.channel_max.update(other.channel_max)
        self.clips.update(other.clips)

    def get(self, table: str, key):
        found = getattr(self, table).get(key)
        if found is None:
            raise ArtifactError(f"the loaded artifact has no {table.replace('_', ' ')} for {key!r}: it was saved "
                                "from another model or with other options")
        return found


_graphs: weakref.WeakSet = weakref.WeakSet()  # every BoundGraph of this process (backend.py adds them)


def _graphs_of(model: torch.nn.Module) -> list:
    params = {id(p) for p in model.parameters()}
    return [g for g in list(_graphs) if any(id(t) in params for _, t, _ in g.current.bound)]


def compiled_reports(compiled_model, verb: str, error: type[ValueError]) -> tuple:
    """(model, config, every build's report) of a quarot-compiled model, for ``save`` and ``export``:
    refused if it was never called (compilation is lazy) or compiled with different options."""
    model = getattr(compiled_model, "_orig_mod", compiled_model)
    graphs = _graphs_of(model)
    if not graphs:
        raise error(f"quarot_fx.{verb}: this model has no quarot-compiled graph yet; compile it with "
                    "backend='quarot' and call it once (compilation happens on the first call)")
    if any(g.config != graphs[0].config for g in graphs):
        raise error(f"quarot_fx.{verb}: the model was compiled with different options in this process; "
                    f"{verb} from a process that compiled it once")
    return model, graphs[0].config, [b.report for g in graphs for b in g.builds.values()]


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Per parameter: shape, dtype and a float64 checksum (Σ w and Σ w·position mod a prime)."""
    result = {}
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1).double()
        ramp = torch.arange(flat.numel(), dtype=torch.float64) % 9973 + 1
        result[name] = [list(p.shape), str(p.dtype).removeprefix("torch."), float(flat.sum()), float((flat * ramp).sum())]
    return result


def save(compiled_model, path, source: str | None = None) -> Path:
    """Write what calibration produced for ``compiled_model`` (already called at least once:
    compilation is lazy) to the directory ``path``; see the module doc. ``source``: how ``load``
    finds the base model again (default: the model config's ``_name_or_path``)."""
    from safetensors.torch import save_file

    from quarot_fx import __version__
    from quarot_fx.kernels import pack_int4

    model, config, reports = compiled_reports(compiled_model, "save", ArtifactError)
    calibrated = Calibrated(config.calibration_id())
    for report in reports:
        calibrated.merge(report.calibrated)
    tensors = {}
    for fqn, (codes, scales) in calibrated.weights.items():
        tensors[f"weight/{fqn}/codes"] = pack_int4(codes.to(torch.int8).contiguous())
        tensors[f"weight/{fqn}/scales"] = scales.float().contiguous()
    for fqn, maxima in calibrated.channel_max.items():
        tensors[f"channel_max/{fqn}"] = maxima.double().contiguous()
    options = {k: v for k, v in config.to_options().items() if k not in ("calibration", "calibrated")}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "quarot_fx_version": __version__,
        "options": options, "calibration_fingerprint": calibrated.fingerprint,
        "source": source or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "weights": {fqn: list(codes.shape) for fqn, (codes, _) in calibrated.weights.items()},
        "clips": [[site, what, clip] for (site, what), clip in calibrated.clips.items()],
        "model": model_fingerprint(model),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / TENSORS))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as error:
        raise ArtifactError(f"{path} is not a quarot-fx artifact: no {MANIFEST}") from error
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON (truncated?): {error}") from error
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST} is not a {FORMAT} (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')!r}; this quarot-fx reads "
                            f"version {FORMAT_VERSION} only: re-save it with this version")
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ArtifactError(f"{path / TENSORS} cannot be read (truncated or corrupt?): {error}") from error
    return manifest, tensors


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


def load(path, model: torch.nn.Module | None = None, **overrides):
    """A quarot-compiled model from a directory written by :func:`save`, with no calibration.

    ``model``: the base model it was saved from (default: load the manifest's ``source``).
    ``overrides``: options that do not change the numbers (``lowering``, ``int_gemm``,
    ``resident_weights``, ``kv_cache``)."""
    import quarot_fx

    path = Path(path)
    manifest, tensors = _read(path)
    allowed = {"lowering", "int_gemm", "resident_weights", "kv_cache"}
    if set(overrides) - allowed:
        raise ArtifactError(f"quarot_fx.load: {sorted(set(overrides) - allowed)} would change the saved model; "
                            f"only {sorted(allowed)} may be overridden")
    if model is None:
        source = manifest.get("source")
        if not source:
            raise ArtifactError(f"{path} does not record where its base model came from; pass model=")
        from quarot_fx.tools.models import load_model

        model = load_model(source)[0]
    _check_model(model, manifest["model"])
    calibrated = Calibrated(manifest.get("calibration_fingerprint"))
    for fqn, shape in manifest["weights"].items():
        try:
            codes = quarot_fx.kernels.unpack_int4(tensors[f"weight/{fqn}/codes"], shape[-1])
            calibrated.weights[fqn] = (codes, tensors[f"weight/{fqn}/scales"])
        except KeyError as error:
            raise ArtifactError(f"{path / TENSORS} lacks the tensors of {fqn} (truncated?)") from error
    for key, tensor in tensors.items():
        if key.startswith("channel_max/"):
            calibrated.channel_max[key.removeprefix("channel_max/")] = tensor
    calibrated.clips = {(site, what): clip for site, what, clip in manifest["clips"]}
    options = {**manifest["options"], **overrides, "calibrated": calibrated}
    return quarot_fx.compile(model, **options)
