"""``ablation``: how much the model's outputs change (relative squared error, summed over outputs and
batches) when that head alone is removed (Michel et al., 2019). The default with ``--calib``."""

from __future__ import annotations

import numpy as np

from .source import Source


def ablation_scores(cal, mean: bool) -> dict[int, np.ndarray]:
    """Each head zeroed in turn (``mean``: replaced by its mean contribution, put into the bias). Batch by
    batch: only one batch's reference outputs are held at a time (an LLM's logits are large)."""
    means = cal.context_means() if mean else None
    scores = {s.block.index: np.zeros(s.block.num_heads) for s in cal.sites}
    total = sum(s.block.num_heads for s in cal.sites) * len(cal.data)
    with cal.bar(total, "ablating heads") as bar:
        for feeds in cal.data:
            ref = cal.run(feeds)
            for s in cal.sites:
                for h in range(s.block.num_heads):
                    scores[s.block.index][h] += cal.loss(ref, cal.run(feeds, _without(cal, s, h, means)))
                    bar.update()
            del ref
    return scores


def _without(cal, s, h: int, means) -> dict[str, np.ndarray]:
    """The weights to feed for site ``s`` with head ``h`` removed (or replaced by its mean, with ``means``)."""
    w = cal.weights[s.weight]
    rows = cal.head_columns(s.block, s.weight, [h])
    feeds_w = {s.weight: _zero_rows(w, rows, s.head_axis)}
    if means is not None:
        cols = cal.head_columns(s.block, s.context, [h])
        shift = means[s.block.index][cols] @ _rows_of(w.astype(np.float64), rows, s.head_axis)
        feeds_w[s.bias] = (cal.weights[s.bias] + shift).astype(cal.weights[s.bias].dtype)
    return feeds_w


def _rows_of(w: np.ndarray, idx, axis: int) -> np.ndarray:
    return np.moveaxis(np.take(w, idx, axis=axis), axis, 0)


def _zero_rows(w: np.ndarray, idx, axis: int) -> np.ndarray:
    out = np.array(w, copy=True)
    index = [slice(None)] * out.ndim
    index[axis] = idx
    out[tuple(index)] = 0
    return out


SOURCE = Source("ablation", "calibration: how much the outputs change with that head alone removed (the "
                "default with --calib, and for `score`)", lambda ctx: ablation_scores(ctx.calibration, False),
                calibrated=True, order=20)
