"""Recovery without retraining (``--compensate``), layer by layer in graph order, each block seeing the
already-recovered blocks before it, on the shared calibration session (``calibration.session.Calibrator``). Each
block's target is what its output projection gave in the original model (``y = x_ref W``); the kept heads'
context in the model recovered so far (``x``) is what it gets now.

* ``bias``: FLAP's bias compensation (An et al., 2024): the mean of what is missing is added to the
  output-projection bias;
* ``scale``: one scale per kept head plus that bias shift, by least squares (the mask tuning of Kwon et al.,
  2022): a handful of parameters per block, which can hardly over-fit;
* ``refit``: a ridge least-squares refit of the kept rows of the output projection and its bias, the ridge
  pulling towards the original rows (not towards zero), so that a strong ridge means "leave it as it was";
* ``auto`` (the default): every one of these, and none, is fitted on three quarters of the calibration data
  and judged on the quarter it did not see; each block gets the one that reconstructs the held-out
  quarter best (refit at the ridge strength that does), fitted again on all of the data. The held-out
  error of each block, before and after, goes into the report.

The dropped heads' rows come out zero, so the compensated model, pruned or masked, is one model: the
pipeline proves the pruned model equal to the compensated original with those heads masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibration.sites import add_bias as _add_bias, find_sites as _find_sites, own_initializer as _initializer
from ..calibration.data import HELD_OUT, held_out_batches
from ..calibration.session import finite
from ..errors import PlanError

COMPENSATE_MODES = ("auto", "bias", "scale", "refit", "none")   # none: off (the budget compensates by default)
RIDGE = 1e-2      # refit: ridge strength relative to the mean eigenvalue of the kept heads' Gram matrix
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)      # auto: the strengths tried on the held-out quarter
# auto: every HELD_OUT-th calibration batch (or the last quarter of the tokens of one) is held out


@dataclass(frozen=True)
class BlockFit:
    """What ``auto`` chose for one block, and the relative held-out error of its output projection
    (``|y - y_hat|^2 / |y - mean(y)|^2`` over the held-out tokens) with no compensation and with the choice."""

    block: int
    mode: str
    error_before: float
    error_after: float


def _error(x, y, rows, shift) -> float:
    d = y - (x @ rows + shift)
    spread = y - y.mean(axis=0)
    return float(np.sum(d * d) / max(float(np.sum(spread * spread)), 1e-30))


def compensation(cal, kept: dict[int, tuple], mode: str, ridge: float = RIDGE,
                 report: list | None = None, dims: dict | None = None, cut: dict | None = None
                 ) -> dict[str, np.ndarray]:
    """New values for the output-projection weights and biases (see the module docstring). ``report``:
    a list that gets one ``BlockFit`` per compensated block.

    After a cut inside the heads (``dims``: {block: {circuit: cut.HeadDims}}), the model recovered is the cut
    one: ``cut`` holds the weights it runs with ({name: array}, the QK and OV maps written in, as
    ``cut.project_heads`` writes them), and a head whose OV circuit is cut to ``z A`` has that rank-r context;
    its fitted rows ``M_h`` (starting from ``Bᵀ W_o,h``) go into the original as ``W_o,h = B (BᵀB)⁻¹ M_h``, which
    the OV map's ``Bᵀ`` turns back into ``M_h`` (and the reference's ``A Bᵀ`` into ``A M_h``)."""
    if mode not in COMPENSATE_MODES:
        raise PlanError(f"unknown compensation {mode!r}; use one of {', '.join(COMPENSATE_MODES)}")
    dims, fed = dims or {}, dict(cut or {})
    held = held_out_batches(len(cal.data))
    new: dict[str, np.ndarray] = {}
    needed = {s.block.index for s in cal.sites
              if tuple(kept.get(s.block.index, range(s.block.num_heads))) != tuple(range(s.block.num_heads))
              or dims.get(s.block.index)}
    # only the contexts of the sites are read, not every output (an LLM's logits are large); run whole, a pass
    # per block, or in segments, about three passes in all (``Calibrator.walk``)
    with cal.bar(len(needed), "compensating") as bar:
        for s, pairs in cal.walk(fed, needed):
            b = s.block
            keep = tuple(kept.get(b.index, range(b.num_heads)))
            circuits = dims.get(b.index, {})
            w = cal.weights[s.weight].astype(np.float64)
            w2 = np.moveaxis(w, s.head_axis, 0)                   # [features, width]
            bias = cal.weights[s.bias].astype(np.float64)
            pieces = _pieces(cal, b, s, keep, circuits.get("ov"))
            xs, ys, part = [], [], []
            for k, (feeds, now, ref) in enumerate(pairs):
                x_now = cal.token_rows(feeds, now, b, s.context)
                x_ref = cal.token_rows(feeds, ref, b, s.context)
                xs.append(np.hstack([x_now[:, cols] if a is None else x_now[:, cols] @ a
                                     for cols, _, a, _ in pieces]))
                ys.append(x_ref @ w2)                             # the original projection, before bias
                part.append(np.full(len(x_now), k in held))
            del pairs
            x, y, part = np.concatenate(xs), np.concatenate(ys), np.concatenate(part)
            finite(x, f"block {b.index} ({b.name}): the kept heads' context on the calibration data")
            finite(y, f"block {b.index} ({b.name}): the output projection on the calibration data")
            if not held:        # one batch: its last quarter of tokens is the held-out part
                part = np.arange(len(x)) >= len(x) - max(len(x) // HELD_OUT, 1)
            w_kept = np.vstack([w2[rows] if bh is None else bh.T.astype(np.float64) @ w2[rows]
                                for _, rows, _, bh in pieces])
            heads_of_row = _row_heads(cal, b, s, keep, pieces)
            chosen, before, after = mode, None, None
            if mode == "auto":
                chosen, before, after = _choose(x, y, w_kept, heads_of_row, part)
            rows, shift = _fit_mode(chosen, x, y, w_kept, heads_of_row, ridge)
            out, now_rows = np.zeros_like(w2), np.zeros_like(w2)
            start = 0
            for _, at, a, bh in pieces:
                m = rows[start:start + (len(at) if bh is None else bh.shape[1])]
                start += len(m)
                if bh is None:
                    out[at] = now_rows[at] = m
                else:       # W_o,h = B (BᵀB)⁻¹ M: the map's Bᵀ gives M back; the cut model runs with A M
                    bh = bh.astype(np.float64)
                    out[at] = bh @ np.linalg.solve(bh.T @ bh, m)
                    now_rows[at] = a.astype(np.float64) @ m
            dtype = cal.weights[s.weight].dtype
            new[s.weight] = np.moveaxis(out, 0, s.head_axis).astype(dtype)
            new[s.bias] = (bias + shift).astype(cal.weights[s.bias].dtype)
            fed[s.weight] = np.moveaxis(now_rows, 0, s.head_axis).astype(dtype)
            fed[s.bias] = new[s.bias]
            finite(new[s.weight], f"block {b.index} ({b.name}): the compensated output projection")
            finite(new[s.bias], f"block {b.index} ({b.name}): the compensated output bias")
            if report is not None and before is not None:
                report.append(BlockFit(b.index, chosen, before, after))
            bar.update()
    return new


def _pieces(cal, block, site, keep, ov) -> list[tuple]:
    """(context columns, output-projection rows, A or None, B or None) of the kept heads: one piece of every
    kept head's positions without an OV cut, else one per head with its maps."""
    if ov is None:
        return [(cal.head_columns(block, site.context, keep), cal.head_columns(block, site.weight, keep), None, None)]
    group = {h: g for g, hs in enumerate(block.kv_groups) for h in hs}
    return [(cal.head_columns(block, site.context, [h]), cal.head_columns(block, site.weight, [h]),
             ov.a[group[h]], ov.b[h]) for h in keep]


def _row_heads(cal, block, site, keep, pieces) -> np.ndarray:
    """Which kept head each fitted row belongs to (for ``scale``): a piece with maps is one head's r rows."""
    out = []
    for i, (_, rows, _, bh) in enumerate(pieces):
        if bh is not None:
            out.append(np.full(bh.shape[1], i, dtype=np.int64))
            continue
        of = np.zeros(len(rows), dtype=np.int64)
        for j, h in enumerate(keep):
            of[np.isin(rows, cal.head_columns(block, site.weight, [h]))] = j
        out.append(of)
    return np.concatenate(out)


def _fit_mode(mode: str, x, y, w_kept, heads_of_row, ridge: float):
    """(rows, shift): the kept output-projection rows and the bias shift that ``mode`` fits on context ``x``
    [tokens, kept width] to target ``y`` [tokens, out]; ``refit@R`` is refit at ridge R. ``heads_of_row``:
    which kept head each kept row belongs to (for ``scale``)."""
    if mode.startswith("refit@"):
        mode, ridge = "refit", float(mode.split("@")[1])
    if mode == "none":
        return w_kept, np.zeros(y.shape[1])
    if mode == "bias":
        return w_kept, (y - x @ w_kept).mean(axis=0)
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    yc = y - ym
    if mode == "scale":       # one factor per kept head on its own output z_h, a small ridge towards 1
        z = np.stack([x[:, heads_of_row == i] @ w_kept[heads_of_row == i] for i in range(heads_of_row.max() + 1)])
        zc = z - z.mean(axis=1, keepdims=True)
        gram = np.einsum("htd,gtd->hg", zc, zc)
        lam = 1e-3 * np.trace(gram) / max(len(gram), 1)
        scales = np.linalg.solve(gram + lam * np.eye(len(gram)), np.einsum("htd,td->h", zc, yc) + lam)
        rows = w_kept * scales[heads_of_row][:, None]
        return rows, (y - x @ rows).mean(axis=0)
    xc = x - xm
    gram = xc.T @ xc
    lam = ridge * np.trace(gram) / max(len(gram), 1)
    rows = np.linalg.solve(gram + lam * np.eye(len(gram)), xc.T @ yc + lam * w_kept)     # towards w_kept
    return rows, ym - xm @ rows


def _choose(x, y, w_kept, heads_of_row, held) -> tuple[str, float, float]:
    """The mode (``refit@R`` for refit) with the least error on the held-out tokens ``held``, fitted on the
    others; with the held-out errors of no compensation and of that mode."""
    fit, test = ~held, held
    errors = {}
    for mode in ("none", "bias", "scale") + tuple(f"refit@{r:g}" for r in RIDGES):
        rows, shift = _fit_mode(mode, x[fit], y[fit], w_kept, heads_of_row, RIDGE)
        errors[mode] = _error(x[test], y[test], rows, shift)
    best = min(errors, key=lambda m: (errors[m], m != "none"))
    return best, errors["none"], errors[best]


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
