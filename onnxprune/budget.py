"""One attention budget: remove a share of the attention MACs, spent where it costs least.

A block's attention MACs are, per dimension of its circuits, the same on both sides: a rank r of the QK circuit
costs the Q and K projections and the scores (``S r (E (n + n_kv) + S n)`` with n query and n_kv KV heads kept),
a rank r of the OV circuit V, the output projection and the context (the same). The planner takes steps, each
where it adds the least loss per MAC saved, until the share is reached: lower a block's QK or OV rank by a step
(both at once where the block has one head size for Q, K and V, GroupQueryAttention's, in steps of a multiple
of 16), or drop one of its heads (the one whose output varies least, ``tr(Σ_z W_o,h W_o,hᵀ)`` of its centred
context, in multi-head and multi-query blocks), or, with grouped KV heads, one whole KV group (a KV head with all
its query heads, the least energy summed over them: the rectangle that the rewrite needs, as ``--gqa group``
keeps; a decode step no longer reads that group's cache). The loss of a step is measured, not assumed: the block
at its new ranks and heads, its circuits fitted on the calibration batches (``transforms.subspace``) and written
into the weights that the calibration session feeds (Q, and the output projection with the dropped heads' rows
zero), the mean context that the cut loses put back into the output bias (what compensation gives back at
least, FLAP's shift), the model run on the held-out batches and its outputs compared with the original's
(``Calibrator.loss``). Without that shift a cut that loses a constant looks dear and one that loses variance
cheap: on MiniLM at 50% the compensated result was 0.947 without it and 0.951 with it.

Blocks' losses are taken as if they added up, and they do not: on Gemma 3 270M at the MACs of ratio 0.5 the
greedy plan, each block's cut cheap alone, gave perplexity x2.85 where whole heads gave x2.39. So the plan
is priced once more with every block cut at once, against whole heads alone at the same MACs (the same number
dropped in every block, as ``--ratio`` does), and the one with the smaller held-out loss wins: the budget is
never worse than heads on its own measure.

Where the pipeline compensates after the cut (``--compensate``, which the budget turns on by default), the two
candidates are priced as they will be shipped: each compensated (``transforms.compensate``, fitted on the batches
that are not held out), then run on the held-out ones. Whole heads gain far more from the refit of the output
projection than cuts inside the heads do (on Gemma 3 at the MACs of ratio 0.5, perplexity x112 -> x2.39 for
heads), so a comparison before compensation favours the mixed plan where, compensated, heads are better.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .block import ONE_SIZE_STEP
from .calibration.sites import head_columns
from .cut import WRITTEN, project_heads, written
from .errors import PlanError
from .plan import exact_ratio
from .progress import Progress
from .transforms.compensate import compensation


@dataclass(frozen=True)
class BudgetChoice:
    """What the budget chose for one block: the heads it keeps, its ranks and the held-out loss measured at
    that choice (the block alone cut; None when whole heads alone won, a plan priced only whole)."""

    block: int
    heads: tuple         # the heads kept
    ranks: dict          # circuit -> rank kept
    loss: float | None


@dataclass(frozen=True)
class BudgetPlan:
    """The budget's plan: a choice per block, which plan won (``"mixed"``: the greedy steps; ``"heads"``: whole
    heads alone), and the held-out loss of each candidate with every block cut at once (None: whole heads
    alone cannot reach the share, e.g. where a block has a single head). ``compensated``:
    the compensation the candidates were priced after (None: priced with the mean shift only)."""

    choices: tuple
    chosen: str
    loss: float
    heads_loss: float | None
    compensated: str | None = None
    uniform: bool = False        # every block the same cut (a GenAI folder's config holds one of each)
    predicted: float | None = None   # with a speed target: the speed-up that the latency model predicts


FEATURES = ("projections", "products", "softmax", "cache")


@dataclass(frozen=True)
class LatencyModel:
    """A block's time at a cut on one provider, at one batch and length: ``coef`` ms per unit of each of
    ``FEATURES`` (``features``), fitted to the measured times of the original and of uniformly cut variants
    (``points``: name, measured ms, predicted ms). ``phase``: ``"forward"`` (``seq`` tokens per sequence, the
    cache empty: an encoder, or an LLM's prompt) or ``"decode"`` (one token against ``total - 1`` cached)."""

    provider: str
    phase: str
    batch: int
    seq: int
    total: int           # the tokens each new one attends to: seq (forward), context + 1 (decode)
    base_ms: float       # the original's measured time
    coef: tuple          # ms per unit of each feature
    points: tuple = ()

    def features(self, block, width: int, heads: int, kv_heads: int, ranks: dict) -> np.ndarray:
        """What ``block`` still computes with ``heads`` query and ``kv_heads`` KV heads and ``ranks``: projection
        MACs, score and context MACs, softmax entries, KV-cache entries (read by a decode step)."""
        b, s, t, d = self.batch, self.seq, self.total, block.head_dim
        rq, rv = ranks.get("qk", d), ranks.get("ov", d)
        k_whole = block.qk_below("k")        # one K head cut at its broadcast: its projection and cache stay whole
        proj = b * s * width * (rq * (heads + (0 if k_whole else kv_heads)) + rv * (heads + kv_heads)
                                + (kv_heads * d if k_whole else 0))
        return np.array([proj, b * s * t * heads * (rq + rv), b * s * t * heads,
                         b * t * kv_heads * ((d if k_whole else rq) + rv)], dtype=np.float64)

    def block_ms(self, block, width: int, heads: int, kv_heads: int, ranks: dict) -> float:
        return float(np.dot(self.coef, self.features(block, width, heads, kv_heads, ranks)))

    def speedup(self, saved_ms: float) -> float:
        """The predicted speed-up of the model when ``saved_ms`` of its time is saved."""
        return self.base_ms / max(self.base_ms - saved_ms, 1e-9)


def unit_macs(block, seq: int, width: int, heads: int | None = None, kv_heads: int | None = None) -> int:
    """MACs of one dimension of one circuit of ``block`` at length ``seq`` with ``heads`` query heads and
    ``kv_heads`` KV heads kept (all by default): the query heads' projection (Q, or the output projection) and
    the KV heads' (K, or V), ``seq * width * (n + n_kv)``, and the scores (or the context), ``seq² * n``."""
    n = block.num_heads if heads is None else heads
    n_kv = block.num_kv_heads if kv_heads is None else kv_heads
    return seq * width * (n + n_kv) + seq * seq * n


def plan_budget(cal, moments, blocks, share, circuits=("qk", "ov"), step=None, seq: int = 128,
                progress: bool = True, heads: bool = True, compensate: str | None = None,
                uniform: bool = False, latency: LatencyModel | None = None, target: float | None = None
                ) -> BudgetPlan:
    """Heads and ranks per block that remove ``share`` of the attention MACs, chosen by measured held-out loss
    per MAC saved. ``cal``: a calibration session that feeds the written projections (``fed``) and computes
    the model's outputs; ``moments``: ``transforms.subspace.Moments`` of it; ``step``: ranks move by this many
    dimensions (``D // 8`` when None); ``heads``: whether dropping a head is a step too; ``compensate``: the
    compensation mode that follows the cut (``--compensate``), which the final candidates are priced after;
    ``uniform``: every block the same (a GenAI folder's config holds one head count and one head size), chosen
    among the uniform plans that reach the share (``_uniform``). With ``latency`` and ``target`` (a speed-up),
    the steps are priced by predicted time saved instead of MACs, until the predicted speed-up reaches
    ``target``; ``share`` is then ignored."""
    share = None if latency is not None else float(exact_ratio(share))
    held = sorted(moments.held_batches) or list(range(len(cal.data)))
    held_set = set(held)
    feeds = [cal.data[i] for i in held]
    base = [cal.run(f) for f in feeds]
    by_index = {b.index: b for b in blocks}
    sites = {s.block.index: s for s in cal.sites}
    width = {b.index: widths(cal, b) for b in blocks}
    steps = {b.index: max(1, step or b.head_dim // 8) for b in blocks}
    for b in blocks:        # one head size (GroupQueryAttention): both circuits by one step that the kernel takes;
        # a quantized model's OV keeps runs of 16 positions (``subspace.fit_ov_select``)
        unit = b.rank_multiple(ONE_SIZE_STEP if moments.select_ov and not b.head_dim % ONE_SIZE_STEP else None)
        if unit:
            steps[b.index] = -(-steps[b.index] // unit) * unit
    joint = {b.index for b in blocks if b.one_head_size and set(circuits) == {"qk", "ov"}}
    order = {b.index: _unit_order(moments, b) if heads and "ov" in circuits and b.num_heads > 1 else ()
             for b in blocks}

    def macs(index, config) -> float:
        b, (kept, ranks) = by_index[index], config
        n_kv = len(b.kept_kv_heads(kept))
        if latency is not None:           # the predicted time instead
            return latency.block_ms(b, width[index], len(kept), n_kv, ranks)
        if b.qk_below("k"):          # one K head cut at its broadcast: its projection stays whole
            whole = seq * width[index] * n_kv * b.head_dim
            return whole + unit_macs(b, seq, width[index], len(kept), 0) * ranks.get("qk", b.head_dim) + \
                unit_macs(b, seq, width[index], len(kept), n_kv) * ranks.get("ov", b.head_dim)
        per = unit_macs(b, seq, width[index], len(kept), n_kv)
        return per * sum(ranks.get(c, b.head_dim) for c in ("qk", "ov"))

    state = {b.index: (tuple(range(b.num_heads)), {c: b.head_dim for c in circuits}) for b in blocks}
    total = sum(macs(i, c) for i, c in state.items())
    wanted = share * total if latency is None else latency.base_ms * (1 - 1 / target)
    if latency is not None and wanted >= total:
        raise PlanError(f"a {target:g}x speed-up would need {wanted:.3g} ms less of the model's {latency.base_ms:.3g} "
                        f"ms, and its attention takes {total:.3g} ms (predicted on {latency.provider} at batch "
                        f"{latency.batch}, {latency.seq} tokens): at most {latency.speedup(total):.2f}x, with no "
                        "attention left; choose a lower target")
    loss = {i: 0.0 for i in state}
    measured: dict = {}

    def cut(index, config) -> dict:
        """The weights that the calibration session feeds, with ``index`` cut to ``config``."""
        kept, ranks = config
        block, site = by_index[index], sites[index]
        weights = {}
        if kept != tuple(range(block.num_heads)):      # the dropped heads' output rows zero
            w = np.array(cal.weights[site.weight], copy=True)
            np.moveaxis(w, site.head_axis, 0)[head_columns(block, site.weight, set(range(block.num_heads)) -
                                                           set(kept))] = 0
            weights[site.weight] = w
        for circuit, rank in ranks.items():
            if rank >= block.head_dim:
                continue
            dims = moments.fit_circuit(index, circuit, rank).dims
            found = {t.name: project_heads(weights.get(t.name, cal.weights[t.name]), block, t, kept, dims)
                     for t in written(block, circuit) if t.name in cal.weights}
            if not found:
                raise PlanError(f"block {index} ({block.name}): the {WRITTEN[circuit]} projection is not fed "
                                "by the calibration session; the budget cannot measure its cut")
            weights.update(found)
        if site.weight in weights and "z_mean" in moments.fit[index]:
            # what the compensation's bias shift gives back at least: the lost part of the mean context
            before = np.moveaxis(cal.weights[site.weight], site.head_axis, 0).astype(np.float64)
            after = np.moveaxis(weights[site.weight], site.head_axis, 0).astype(np.float64)
            shift = moments.fit[index]["z_mean"] @ (before - after).reshape(len(before), -1)
            bias = cal.weights[site.bias]
            weights[site.bias] = (bias + shift.reshape(bias.shape)).astype(bias.dtype)
        return weights

    def held_out(weights) -> float:
        return float(np.mean([cal.loss(ref, cal.run(f, weights)) for ref, f in zip(base, feeds)]))

    def measure(index, config) -> float:
        kept, ranks = config
        key = (index, kept, tuple(sorted(ranks.items())))
        if key not in measured:
            measured[key] = held_out(cut(index, config))
            bar.update()
        return measured[key]

    def whole(plan) -> float | None:
        """The held-out loss with every block of ``plan`` cut at once (None where blocks share a weight)."""
        weights = {}
        for index, config in plan.items():
            one = cut(index, config)
            if set(one) & set(weights):
                return None
            weights.update(one)
        return held_out(weights)

    def recovered(plan) -> float | None:
        """The held-out loss of ``plan`` compensated (``compensate``), fitted on the other batches (None where
        blocks share an output projection, which one refit cannot serve)."""
        if cal.shared:
            return None
        kept = {i: k for i, (k, _) in plan.items()}
        dims = {i: {c: moments.fit_circuit(i, c, r).dims for c, r in ranks.items() if r < by_index[i].head_dim}
                for i, (_, ranks) in plan.items()}
        dims = {i: d for i, d in dims.items() if d}
        weights = {t.name: project_heads(cal.weights[t.name], by_index[i], t, kept[i], d)
                   for i, ds in dims.items() for d in ds.values() for t in written(by_index[i], d.circuit)}
        fit = copy.copy(cal)          # the same session, fitted on the batches that are not held out
        fit.data = [f for i, f in enumerate(cal.data) if i not in held_set] or cal.data
        fit.progress = False
        new = compensation(fit, kept, compensate, dims=dims, cut=weights)
        for index, ds in dims.items():       # the output projection as the cut model runs it: A Bᵀ W_o,h = A M_h
            site, ov = sites[index], ds.get("ov")
            if ov is not None and site.weight in new:
                t = next(t for t in written(by_index[index], "ov") if t.name == site.weight)
                new[site.weight] = project_heads(new[site.weight], by_index[index], t, kept[index], ov)
        return held_out({**weights, **new})

    def moves(index):
        kept, ranks = state[index]
        if index in joint:          # one head size: QK (whole rotary pairs, where it has them) and OV together
            new = ranks["qk"] - steps[index]
            if new >= 1 and by_index[index].selects_dims:
                new = moments.fit_circuit(index, "qk", new).dims.rank
            if 1 <= new < ranks["qk"]:
                yield kept, {"qk": new, "ov": new}
        for circuit, rank in ranks.items() if index not in joint else ():
            new = rank - steps[index]
            if new >= 1 and circuit == "qk" and by_index[index].selects_dims:
                new = moments.fit_circuit(index, circuit, new).dims.rank     # whole rotary pairs: what it reaches
            if 1 <= new < rank:
                yield kept, {**ranks, circuit: new}
        rest = [unit for unit in order[index] if set(unit) <= set(kept)]
        if len(rest) > 1:
            yield tuple(h for h in kept if h not in rest[0]), ranks

    def shipped_loss(plan) -> float:
        """``plan``'s held-out loss with every block cut at once, after the compensation that follows."""
        if compensate not in (None, "none"):
            after = recovered(plan)
            if after is not None:
                return after
        return whole(plan)

    saved = 0.0
    with Progress(len(state) * 12, "planning the attention budget", unit="fits",
                  min_total=1 if progress else 10 ** 9) as bar:
        if uniform:
            return _uniform(state, order, macs, total - wanted, by_index, steps, circuits, moments,
                            shipped_loss, compensate, latency)
        while saved < wanted:
            best = None
            for index in state:
                now = macs(index, state[index])
                for config in moves(index):
                    gain = now - macs(index, config)
                    if gain <= 0:
                        continue
                    price = (measure(index, config) - loss[index]) / gain
                    if best is None or price < best[0]:
                        best = (price, index, config, gain)
            if best is None:
                raise PlanError(f"the attention budget cannot remove {share:.0%} of the attention MACs with every "
                                "circuit at rank 1" if latency is None else
                                f"no cut reaches a predicted {target:g}x: at most "
                                f"{latency.speedup(saved):.2f}x with every circuit at rank 1")
            _, index, config, gain = best
            state[index] = config
            loss[index] = measure(index, config)
            saved += gain
        mixed = whole(state)
        alone = _heads_alone(state, order, macs, total - wanted, {i: by_index[i].head_dim for i in state})
        heads_loss = whole(alone) if alone is not None and mixed is not None else None
        priced = None
        if compensate not in (None, "none") and heads_loss is not None:
            after = recovered(state), recovered(alone)
            if None not in after:
                (mixed, heads_loss), priced = after, compensate
        chosen = "heads" if heads_loss is not None and heads_loss < mixed else "mixed"
    if chosen == "heads":          # priced whole, not block by block
        state, loss = alone, dict.fromkeys(alone)
    choices = tuple(BudgetChoice(i, kept, {c: ranks[c] for c in circuits}, loss[i])
                    for i, (kept, ranks) in state.items())
    predicted = None if latency is None else latency.speedup(total - sum(macs(i, c) for i, c in state.items()))
    return BudgetPlan(choices, chosen, heads_loss if chosen == "heads" else mixed, heads_loss, priced,
                      predicted=predicted)


def _uniform(state, order, macs, allowed, by_index, steps, circuits, moments, loss_of, compensate,
             latency=None) -> BudgetPlan:
    """Every block the same: ``k`` units dropped (heads or KV groups, each block its own least useful, ``order``)
    and one rank for every circuit; for each ``k``, the largest rank (in the budget's steps, whole rotary pairs
    where it has them) that brings the MACs to ``allowed``; the candidate with the smallest held-out loss
    (``loss_of``: every block cut, compensated as it will be shipped) wins."""
    first = next(iter(state))
    d, step = by_index[first].head_dim, steps[first]
    if any(by_index[i].head_dim != d or by_index[i].num_heads != by_index[first].num_heads for i in state):
        raise PlanError("the blocks differ in head count or head size; one plan for all cannot be made")
    drops = range(min(len(order[i]) for i in state)) if all(order[i] for i in state) else range(1)
    candidates = []
    for k in drops:
        for r in range(d, 0, -step):
            ranks = {}
            for c in circuits:
                ranks[c] = r
                if r < d and c == "qk" and by_index[first].selects_dims:     # whole pairs: what the fit reaches
                    ranks[c] = moments.fit_circuit(first, c, r).dims.rank
            if "ov" in ranks and "qk" in ranks:
                ranks["ov"] = ranks["qk"]
            plan = {i: (_keeping(order[i], k) or tuple(range(by_index[i].num_heads)), dict(ranks)) for i in state}
            if sum(macs(i, c) for i, c in plan.items()) <= allowed + 1e-9 * allowed:
                candidates.append((k, r, plan))
                break
    if not candidates:
        raise PlanError("no plan that is the same in every block removes that share of the attention MACs"
                        if latency is None else "no plan that is the same in every block reaches that speed-up")
    losses = [loss_of(plan) for _, _, plan in candidates]
    best = int(np.argmin(losses))
    _, r, plan = candidates[best]
    heads_loss = next((loss for (k, rank, _), loss in zip(candidates, losses) if k and rank == d), None)
    chosen = "heads" if r == d else "mixed"
    choices = tuple(BudgetChoice(i, kept, {c: ranks[c] for c in circuits}, None) for i, (kept, ranks) in plan.items())
    total = sum(macs(i, c) for i, c in state.items())
    predicted = None if latency is None else latency.speedup(total - sum(macs(i, c) for i, c in plan.items()))
    return BudgetPlan(choices, chosen, losses[best], heads_loss, compensate if compensate not in (None, "none") else None,
                      uniform=True, predicted=predicted)


def _heads_alone(state, order, macs, allowed, head_dims) -> dict | None:
    """Whole heads alone at the budget's MACs: every block drops its first ``k`` units of ``order`` (the same
    ``k`` everywhere, the least that brings the MACs to ``allowed``), its ranks whole; None when no ``k`` does."""
    if not state or any(not order[i] for i in state):
        return None
    for k in range(1, min(len(order[i]) for i in state)):
        plan = {i: (_keeping(order[i], k), {c: head_dims[i] for c in ranks})
                for i, (_, ranks) in state.items()}
        if sum(macs(i, c) for i, c in plan.items()) <= allowed + 1e-9 * allowed:
            return plan
    return None


def _keeping(order, k: int) -> tuple:
    """The heads kept when the first ``k`` units of ``order`` (``_unit_order``: every head, in units) go."""
    dropped = {h for unit in order[:k] for h in unit}
    return tuple(sorted(h for unit in order for h in unit if h not in dropped))


def _unit_order(moments, block) -> tuple:
    """What one step drops in ``block``, the unit whose output varies least on the calibration batches first:
    single heads where any one can go alone (one head per KV head, or one KV head for all), else whole KV groups.
    A head's measure is the energy ``tr(Σ_z,h G_h)`` of its centred context (its mean goes into the output bias
    when it is dropped); a group's, the sum over its query heads."""
    fit, gram = moments.fit[block.index], moments.gram_o[block.index]
    means = fit.get("z_heads_mean", {})
    energy = {h: float(np.trace((fit["z"][h] - (np.outer(means[h], means[h]) if h in means else 0)) @ gram[h]))
              for h in range(block.num_heads)}
    units = ([(h,) for h in range(block.num_heads)] if block.num_kv_heads in (1, block.num_heads)
             else [tuple(g) for g in block.kv_groups])
    return tuple(sorted(units, key=lambda u: (sum(energy[h] for h in u), u)))


def widths_of(model, block) -> int:
    """The model width E that ``block``'s output projection writes, from its weight's shape in ``model``."""
    o = block.o_proj
    dims = next((list(t.dims) for t in model.graph.initializer if t.name == o.weight), None)
    if not dims:
        return block.num_heads * block.head_dim
    return int(np.prod(dims) // dims[o.head_axis])


def widths(cal, block) -> int:
    """The model width E that the block's output projection writes (its weight is fed by every session)."""
    o = block.o_proj
    arr = cal.weights.get(o.weight)
    if arr is None:
        return block.num_heads * block.head_dim
    return int(arr.size // arr.shape[o.head_axis])
