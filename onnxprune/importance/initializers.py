"""``initializers``: scores stored in the model by ``onnxprune score`` (``<block>.head_importance`` or one
``[blocks, H]`` table), or named by ``--importance-initializer``. The default when the model has them."""

from __future__ import annotations

from ..errors import PlanError
from . import Source


def stored(model, blocks, pattern=None):
    from ..score import initializer_importance
    return initializer_importance(model, blocks, pattern)


def _score(ctx):
    found = stored(ctx.model, ctx.blocks, ctx.options.importance_initializer)
    if found is None:
        pattern = ctx.options.importance_initializer
        raise PlanError("the model has no importance initializers" + (f" matching {pattern!r}" if pattern else ""))
    return found


SOURCE = Source("initializers", "scores stored in the model (`onnxprune score`); the default when the model "
                "has them", _score, order=80)
