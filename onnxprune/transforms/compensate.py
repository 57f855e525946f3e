"""Recovery without retraining (``--compensate``), layer by layer in graph order, each block seeing the
already-recovered blocks before it, on the shared calibration session (``calibrate.Calibrator``):

* ``bias``: FLAP's bias compensation (An et al., 2024): the mean of the dropped heads' projected outputs is
  added to the output-projection bias;
* ``refit``: a ridge least-squares refit of the kept rows of the output projection (and its bias) to the
  original block output, on the calibration tokens.

The dropped heads' rows come out zero, so the compensated model, pruned or masked, is one model: the
pipeline proves the pruned model equal to the compensated original with those heads masked.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibrate import _add_bias, _find_sites, _initializer, finite
from ..errors import PlanError
from ..options import COMPENSATE_MODES

RIDGE = 1e-2      # refit: ridge strength relative to the mean eigenvalue of the kept heads' Gram matrix


def compensation(cal, kept: dict[int, tuple], mode: str, ridge: float = RIDGE) -> dict[str, np.ndarray]:
    """New values for the output-projection weights and biases (see the module docstring)."""
    if mode not in COMPENSATE_MODES:
        raise PlanError(f"unknown compensation {mode!r}; use one of {', '.join(COMPENSATE_MODES)}")
    original = [cal.run(f, contexts=True) for f in cal.data]
    new: dict[str, np.ndarray] = {}
    with cal.bar(len(cal.sites), "compensating") as bar:
        for s in cal.sites:
            b = s.block
            keep = tuple(kept.get(b.index, range(b.num_heads)))
            if keep == tuple(range(b.num_heads)):
                bar.update()
                continue
            w = cal.weights[s.weight].astype(np.float64)
            w2 = np.moveaxis(w, s.head_axis, 0)                   # [features, width]
            bias = cal.weights[s.bias].astype(np.float64)
            kept_rows = cal.head_columns(b, s.weight, keep)
            kept_cols = cal.head_columns(b, s.context, keep)
            xs, ys = [], []
            for feeds, ref in zip(cal.data, original):
                now = cal.run(feeds, new, contexts=True) if new else ref
                x_now = cal.rows(feeds, now[s.context], s)
                x_ref = cal.rows(feeds, ref[s.context], s)
                xs.append(x_now[:, kept_cols])
                ys.append(x_ref @ w2)                             # the original projection, before bias
            x, y = np.concatenate(xs), np.concatenate(ys)
            if mode == "bias":
                w_kept = w2[kept_rows]
                shift = (y - x @ w_kept).mean(axis=0)
            else:
                xm, ym = x.mean(axis=0), y.mean(axis=0)
                xc, yc = x - xm, y - ym
                gram = xc.T @ xc
                lam = ridge * np.trace(gram) / max(len(gram), 1)
                w_kept = np.linalg.solve(gram + lam * np.eye(len(gram)), xc.T @ yc)
                shift = ym - xm @ w_kept
            out = np.zeros_like(w2)
            out[kept_rows] = w_kept
            new[s.weight] = np.moveaxis(out, 0, s.head_axis).astype(cal.weights[s.weight].dtype)
            new[s.bias] = (bias + shift).astype(cal.weights[s.bias].dtype)
            finite(new[s.weight], f"block {b.index} ({b.name}): the compensated output projection")
            finite(new[s.bias], f"block {b.index} ({b.name}): the compensated output bias")
            bar.update()
    return new


def with_weights(model: onnx.ModelProto, cal, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the compensated weights and biases written in (a bias-free projection gets
    its Add)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for s in _find_sites(out, cal.blocks):
        if s.weight not in new:
            continue
        bias = s.bias or _add_bias(out, s)
        for name, value in ((s.weight, new[s.weight]), (bias, new[next(
                x.bias for x in cal.sites if x.weight == s.weight)])):
            proto = _initializer(out, name)
            proto.CopyFrom(numpy_helper.from_array(value, name))
    return out
