"""``gates``: the values of head gates (a per-head constant ``Mul`` between the attention probabilities and
the output projection), folded into the projections' rows. Used when the model has gates and no stored
scores, and no other source is named."""

from __future__ import annotations

from ..errors import PlanError
from .source import Source


def _score(ctx):
    if not ctx.gate_scores:
        raise PlanError("the model has no head gates to score by")
    return ctx.gate_scores


SOURCE = Source("gates", "the values of folded head gates (L0 gates, head masks); used when present",
                _score, order=85)
