"""onnxprune: remove attention heads from transformer models already exported to ONNX, and prove the
result exact.

    from onnxprune import prune_model
    result = prune_model("model.onnx", 0.5)      # result.model, result.kept, result.max_error

The pipeline (``pipeline.py``) runs match -> fold gates -> score -> plan -> compensate -> rewrite -> verify
over ``PruneOptions`` (``options.py``); importance sources are a registry (``importance/``).
"""

from .api import PruneResult, count_result_macs, inspect_model, prune_model, score_model
from .errors import (InputError, MatchError, ModelTypeError, OnnxPruneError, OutputError, PlanError, RewriteError,
                     VerifyError)
from .options import PruneOptions
from .plan import keep_count, prune_attention_heads, select_heads

__version__ = "0.1.0"
__all__ = ["prune_model", "PruneOptions", "PruneResult", "inspect_model", "score_model", "count_result_macs",
           "keep_count", "select_heads", "prune_attention_heads", "OnnxPruneError", "InputError",
           "ModelTypeError", "MatchError", "PlanError", "RewriteError", "VerifyError", "OutputError"]
