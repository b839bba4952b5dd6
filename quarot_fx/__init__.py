"""quarot-fx: a torch.compile backend that rotates LLMs so they run in 4 bits.

    model = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4"})

or, equivalently, ``quarot_fx.compile(model, preset="w4a4kv4")``. Importing the package imports
the compiler only: model loading, evaluation and the demo live in ``quarot_fx.tools``.
"""

from __future__ import annotations

from . import kernels  # noqa: F401  (registers the quarot_fx:: custom ops)
from . import generation
from .artifact import load, save
from .backend import ForeignCacheError, compile, quarot_backend
from .calibrated import ArtifactError
from .config import PRESETS, QuaRotConfig
from .explain import Explanation, explain
from .exporter import ExportError, export, load_compressed_tensors
from .generation import RecompileLimitError
from .kv_cache import PackedKVCache, PackedStaticKVCache
from .numerics.hadamard import HadamardOrderError, hadamard_matrix, hadamard_plan, next_hadamard_order
from .numerics.rotations import register_rotation, rotation_kinds, rotation_matrix
from .numerics.weight_methods import register_weight_method, weight_methods
from .report import QuaRotWarning, Report, collect_reports
from .version import __version__

generation.install()  # generate() on a quarot-compiled module runs the compiled forward

__all__ = [
    "PRESETS", "ArtifactError", "ExportError", "Explanation", "ForeignCacheError", "HadamardOrderError", "QuaRotConfig",
    "QuaRotWarning", "RecompileLimitError", "Report", "__version__", "collect_reports", "compile", "explain", "export",
    "hadamard_matrix", "hadamard_plan", "load", "load_compressed_tensors", "next_hadamard_order", "PackedKVCache",
    "PackedStaticKVCache", "quarot_backend", "register_rotation", "register_weight_method", "rotation_kinds", "rotation_matrix", "save",
    "weight_methods",
]
