"""onnxprune: remove attention heads from transformer models already exported to ONNX.

    from onnxprune import prune_attention_heads, select_heads, prune_model
"""

from .api import PruneResult, inspect_model, prune_model
from .errors import InputError, MatchError, OnnxPruneError, PlanError, RewriteError, VerifyError
from .plan import keep_count, prune_attention_heads, select_heads

__version__ = "0.1.0"
__all__ = ["prune_attention_heads", "select_heads", "keep_count", "prune_model", "inspect_model", "PruneResult",
           "OnnxPruneError", "InputError", "MatchError", "PlanError", "RewriteError", "VerifyError"]
