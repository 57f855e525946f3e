"""``mean-ablation`` (ours): like ``ablation``, with the head replaced by its mean contribution instead of
zero: the change that ``--compensate`` cannot undo, since compensation puts the mean back (the variance of
a head's contribution, not its size, is what pruning loses)."""

from __future__ import annotations

from .source import Source
from .ablation import ablation_scores

SOURCE = Source("mean-ablation", "calibration: the same, with the head replaced by its mean (what "
                "--compensate cannot restore)", lambda ctx: ablation_scores(ctx.calibration, True),
                calibrated=True, order=30)
