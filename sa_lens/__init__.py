"""sa_lens: Safety Arithmetic (Hazra et al., EMNLP 2024) on TransformerLens 4, and where the harm lives."""

from sa_lens import analysis
from sa_lens.edit_area import EditArea, detect_edit_area
from sa_lens.evaluation.harness import evaluate
from sa_lens.export import export_harm_removed
from sa_lens.generation import enable_kv_cache, generate
from sa_lens.harm_removal import HarmRemoval, apply_harm_removal, harm_removal
from sa_lens.harm_vector import HarmVector, checkpoint_parameters
from sa_lens.lens import SafetyLens
from sa_lens.merging import dare, ties_merge
from sa_lens.models import load_hf_model, load_model
from sa_lens.precision import float32_matmul_precision
from sa_lens.safety_vector import SafetyVector, demonstration_text
from sa_lens.sparse_delta import SparseDelta
from sa_lens.steering import safety_hooks

__version__ = "0.1.0"

__all__ = [
    "EditArea",
    "HarmRemoval",
    "HarmVector",
    "SparseDelta",
    "analysis",
    "apply_harm_removal",
    "SafetyLens",
    "SafetyVector",
    "checkpoint_parameters",
    "dare",
    "detect_edit_area",
    "demonstration_text",
    "enable_kv_cache",
    "evaluate",
    "export_harm_removed",
    "float32_matmul_precision",
    "generate",
    "harm_removal",
    "load_hf_model",
    "load_model",
    "safety_hooks",
    "ties_merge",
]
