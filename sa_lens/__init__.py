"""sa_lens: Safety Arithmetic (Hazra et al., EMNLP 2024) on TransformerLens 4, and where the harm lives.

``import sa_lens`` loads no plotting library and no pandas: :mod:`sa_lens.analysis` (figures, tables, views)
is imported on first use of ``sa_lens.analysis`` (PEP 562 ``__getattr__`` below).
"""

import importlib
from importlib.metadata import version

from sa_lens import interventions
from sa_lens.demonstrations import Demonstration, demonstration_pairs, load_demonstrations
from sa_lens.edit_area import EditArea, detect_edit_area, edit_area_vector
from sa_lens.edit_requests import EditRequest, load_edits
from sa_lens.editing import RomeOptions, apply_edits, edit_scores, knowledge_edit, save_edited
from sa_lens.errors import ConvergenceError, InputError, SaLensError
from sa_lens.evaluation.harness import evaluate
from sa_lens.export import export_harm_removed
from sa_lens.generation import enable_kv_cache, generate
from sa_lens.harm_removal import apply_harm_removal, harm_removal
from sa_lens.harm_vector import HarmVector, checkpoint_parameters
from sa_lens.interventions import Compose, DirectionalAblation, HarmRemoval, HeadAblation, KnowledgeEdit, SafeAlign
from sa_lens.layer_spec import parse_layers
from sa_lens.lens import SafetyLens
from sa_lens.merging import dare, ties_merge
from sa_lens.models import load_hf_model, load_model
from sa_lens.precision import float32_matmul_precision
from sa_lens.safety_vector import SafetyVector, demonstration_text
from sa_lens.sparse_delta import SparseDelta
from sa_lens.steering import safety_hooks
from sa_lens.streamed_export import export_harm_removed_streamed

__version__ = version("sa_lens")

# Submodules imported on first attribute access, because they pull in heavy optional libraries.
_LAZY_SUBMODULES = ("analysis",)

__all__ = [
    "Compose",
    "ConvergenceError",
    "Demonstration",
    "DirectionalAblation",
    "EditArea",
    "EditRequest",
    "HarmRemoval",
    "HeadAblation",
    "InputError",
    "KnowledgeEdit",
    "RomeOptions",
    "SafeAlign",
    "SaLensError",
    "HarmVector",
    "SafetyLens",
    "SafetyVector",
    "SparseDelta",
    "analysis",
    "apply_edits",
    "apply_harm_removal",
    "checkpoint_parameters",
    "dare",
    "demonstration_pairs",
    "demonstration_text",
    "detect_edit_area",
    "edit_area_vector",
    "edit_scores",
    "enable_kv_cache",
    "evaluate",
    "export_harm_removed",
    "export_harm_removed_streamed",
    "float32_matmul_precision",
    "generate",
    "harm_removal",
    "interventions",
    "knowledge_edit",
    "load_edits",
    "load_demonstrations",
    "load_hf_model",
    "load_model",
    "parse_layers",
    "safety_hooks",
    "save_edited",
    "ties_merge",
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it here, so this runs once
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
