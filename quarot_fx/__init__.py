"""quarot-fx: a torch.compile backend that rotates LLMs so they run in 4 bits.

    model = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4"})

or, equivalently, ``quarot_fx.compile(model, preset="w4a4kv4")``.
"""

from __future__ import annotations

import importlib
import sys

import torch

from . import kernels  # noqa: F401  (registers the quarot_fx:: custom ops)
from . import generation
from .generation import RecompileLimitError
from .backend import ForeignCacheError, quarot_backend
from .config import PRESETS, QuaRotConfig
from .explain import Explanation, explain
from .numerics.hadamard import HadamardOrderError, hadamard_matrix, hadamard_plan, next_hadamard_order
from .report import QuaRotWarning, Report, collect_reports
from .artifact import ArtifactError, load, save
from .exporter import ExportError, export, load_compressed_tensors
from .kv_cache import PackedKVCache, PackedStaticKVCache
from .numerics.rotations import register_rotation, rotation_kinds, rotation_matrix

__version__ = "0.1.0"

# Modules moved into numerics/ and tools/ keep their old import paths (users' scripts use them).
for _folder, _names in (("numerics", ("hadamard", "finite_field", "rotations", "quant", "gptq")),
                        ("tools", ("evaluate", "models", "demo"))):
    for _name in _names:
        sys.modules[f"{__name__}.{_name}"] = globals()[_name] = importlib.import_module(f"{__name__}.{_folder}.{_name}")

generation.install()  # generate() on a quarot-compiled module runs the compiled forward


def compile(model, config: QuaRotConfig | None = None, *, fullgraph: bool = False, dynamic=None, **options):
    """``torch.compile(model, backend="quarot", options=...)`` with options checked up front.

    The result's ``generate()`` runs the compiled (quantized) forward at every step."""
    if config is not None and options:
        raise ValueError("pass either a QuaRotConfig or option keywords, not both")
    config = config or QuaRotConfig.from_options(options)
    return torch.compile(model, backend="quarot", options=config.to_options(),
                         fullgraph=fullgraph, dynamic=dynamic)


__all__ = [
    "PRESETS", "ArtifactError", "ExportError", "Explanation", "ForeignCacheError", "HadamardOrderError", "QuaRotWarning", "RecompileLimitError", "explain", "QuaRotConfig", "Report", "collect_reports", "compile",
    "export", "hadamard_matrix", "hadamard_plan", "load", "load_compressed_tensors", "next_hadamard_order", "PackedKVCache", "PackedStaticKVCache", "quarot_backend", "register_rotation", "rotation_kinds",
    "rotation_matrix", "save",
]
