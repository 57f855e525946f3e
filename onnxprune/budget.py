"""One attention budget: remove a share of the attention MACs, spent where it costs least.

Each block's attention MACs are, per dimension of its circuits, the same on both sides: a rank r of the QK circuit
costs the Q and K projections and the scores (``S r (E (H + H_kv) + S H)``), a rank r of the OV circuit V, the
output projection and the context (the same). The planner lowers ranks step by step, each time where the next
step adds the least loss per MAC saved, until the share is reached. The loss of a step is measured, not
assumed: the block's circuit fitted at that rank on the calibration batches (``transforms.subspace``) and written
into the weights that the calibration session feeds (the output projection for OV, Q for QK), the model run on
the held-out batches, and its outputs compared with the original's (``Calibrator.loss``). Steps of different
blocks are taken as if their losses added up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cut import WRITTEN, project_heads, written
from .errors import PlanError
from .plan import exact_ratio
from .progress import Progress


@dataclass(frozen=True)
class BudgetChoice:
    """What the budget chose for one block: its ranks and the held-out loss measured at them one by one."""

    block: int
    ranks: dict          # circuit -> rank kept
    losses: dict         # circuit -> held-out loss of that circuit's cut alone


def unit_macs(block, seq: int, width: int) -> int:
    """MACs of one dimension of one circuit of ``block`` at length ``seq``, every head kept: the query heads'
    projection (Q, or the output projection) and the KV heads' (K, or V), ``seq * width * (H + H_kv)``, and
    the scores (or the context), ``seq² * H``."""
    return seq * width * (block.num_heads + block.num_kv_heads) + seq * seq * block.num_heads


def plan_budget(cal, moments, blocks, share, circuits=("qk", "ov"), step=None, seq: int = 128,
                progress: bool = True) -> list[BudgetChoice]:
    """Ranks per block and circuit that remove ``share`` of the attention MACs (every head kept), chosen by
    measured held-out loss per MAC saved. ``cal``: a calibration session that feeds the written projections
    (``fed``) and computes the model's outputs; ``moments``: ``transforms.subspace.Moments`` of it; ``step``:
    ranks move by this many dimensions (``D // 8`` when None)."""
    share = float(exact_ratio(share))
    held = sorted(moments.held_batches) or list(range(len(cal.data)))
    feeds = [cal.data[i] for i in held]
    base = [cal.run(f) for f in feeds]
    cost = {}
    total = 0
    for b in blocks:
        cost[b.index] = unit_macs(b, seq, widths(cal, b))
        total += cost[b.index] * b.head_dim * 2
    target = share * total
    ranks = {(b.index, c): b.head_dim for b in blocks for c in circuits}
    steps = {b.index: max(1, step or b.head_dim // 8) for b in blocks}
    loss = {key: 0.0 for key in ranks}
    by_index = {b.index: b for b in blocks}
    measured: dict = {}

    def measure(index, circuit, rank) -> float:
        key = (index, circuit, rank)
        if key not in measured:
            block = by_index[index]
            dims = moments.fit_circuit(index, circuit, rank).dims
            weights = {t.name: project_heads(cal.weights[t.name], block, t, range(block.num_heads), dims)
                       for t in written(block, circuit) if t.name in cal.weights}
            if not weights:
                raise PlanError(f"block {index} ({block.name}): the {WRITTEN[circuit]} projection is not fed by the "
                                "calibration session; the budget cannot measure its cut")
            measured[key] = float(np.mean([cal.loss(ref, cal.run(f, weights)) for ref, f in zip(base, feeds)]))
            bar.update()
        return measured[key]

    saved = 0.0
    with Progress(len(ranks) * 8, "planning the attention budget", unit="fits",
                  min_total=1 if progress else 10 ** 9) as bar:
        while saved < target:
            best = None
            for (index, circuit), rank in ranks.items():
                new = rank - steps[index]
                if new < 1:
                    continue
                gain = (rank - new) * cost[index]
                price = (measure(index, circuit, new) - loss[(index, circuit)]) / gain
                if best is None or price < best[0]:
                    best = (price, index, circuit, new, gain)
            if best is None:
                raise PlanError(f"the attention budget cannot remove {share:.0%} of the attention MACs with every "
                                "circuit at rank 1")
            _, index, circuit, new, gain = best
            ranks[(index, circuit)] = new
            loss[(index, circuit)] = measured[(index, circuit, new)]
            saved += gain
    return [BudgetChoice(b.index, {c: ranks[(b.index, c)] for c in circuits},
                         {c: loss[(b.index, c)] for c in circuits}) for b in blocks]


def widths(cal, block) -> int:
    """The model width E that the block's output projection writes (its weight is fed by every session)."""
    o = block.o_proj
    arr = cal.weights.get(o.weight)
    if arr is None:
        return block.num_heads * block.head_dim
    return int(arr.size // arr.shape[o.head_axis])
