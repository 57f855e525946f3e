"""Cuts inside the heads, fitted: each kept head's QK and OV circuits kept at rank r, chosen from second
moments of its activations (or of its weights alone), as ``cut.HeadDims`` for the rewriter.

For one circuit ``x A Bᵀ y`` (``cut.HeadDims``), with ``C_x`` and ``C_y`` the second moments of the two sides
over calibration tokens, the error of keeping rank r is ``E|x (I - X) y|² = tr((I - X)ᵀ C_x (I - X) C_y)``
with ``X = A Bᵀ``; the best X of rank r comes from the SVD of ``C_x^½ C_y^½`` (reduced-rank regression):

* **QK**, the scores ``q X kᵀ``: x = q (per query head), y = k (shared by a KV group). With the right
  singular vectors V_r of the query heads' ``C_q^½ C_k^½`` stacked, ``A = C_k^-½ V_r`` on K (one per KV head)
  and ``B = C_k^½ V_r`` on Q: the best rank-r scores for every head of the group at once.
* **OV**, each head's output ``z X W_o,h``: x = the head's context z (``C_z``), y = its output-projection rows
  (``G = W_o,h W_o,hᵀ``). ``A = C^-½ U_r`` on V (one per KV head, from its query heads' pooled ``C_z`` and
  ``G``), then each query head's ``B`` by least squares given ``A``: ``Bᵀ = (Aᵀ C_z A)⁻¹ Aᵀ C_z``. With one
  head per KV head this is the optimum.

Through a rotary embedding (Llama, GPT-J, Phi) the QK circuit can only keep whole positions, its pairs
``(i, j)`` that the embedding turns by an angle that depends on the distance between query and key. Averaged
over the angle, a pair's share of the scores is ``½ tr(C_q,pair) tr(C_k,pair)`` (the cross terms turn at
other speeds and average out), summed over the heads of the block: ``fit_qk_select`` keeps the pairs (and
unturned positions, ``C_q,ii C_k,ii``) with the largest shares, the same for every head, as the cos/sin
tables they all read must be cut once.

The error is judged on held-out calibration batches (moments of batches the fit did not see) and reported
relative to the circuit's energy, ``tr(C_x C_y)`` for QK and ``tr(C_z G)`` for OV. Written by hand: it is
a few lines of numpy linear algebra per head, which no library offers in this form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..calibration.data import held_out_batches
from ..calibration.sites import broadcast_key, projection_input, projection_output
from ..cut import HeadDims, packed_runs
from ..errors import PlanError
from ..model.proto import constant_array

RIDGE = 1e-6          # relative to the largest eigenvalue: directions the data never visits stay invertible


@dataclass(frozen=True)
class CircuitFit:
    """One block's fitted circuit: the maps and their relative error on held-out batches."""

    dims: HeadDims
    error: float


def roots(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``c^½`` and ``c^-½`` of a symmetric positive semi-definite ``c``, its small eigenvalues lifted."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    w = np.maximum(w, RIDGE * max(float(w.max()), 1e-30))
    return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def fit_qk(cq: dict, ck: dict, groups, rank: int) -> HeadDims:
    """``cq``: {head: C_q}, ``ck``: {kv head: C_k}, ``groups``: the query heads of each KV head."""
    a, b = {}, {}
    for g, heads in enumerate(groups):
        ks, ki = roots(ck[g])
        m = np.vstack([roots(cq[h])[0] @ ks for h in heads])
        v = np.linalg.svd(m)[2][:rank].T
        a[g], r = orthonormal(ki @ v)
        for h in heads:
            b[h] = (ks @ v @ r.T).astype(np.float32)
    return HeadDims("qk", a, b)


def fit_qk_select(cq: dict, ck: dict, groups, pairs, head_dim: int, rank: int, parts=()) -> HeadDims:
    """Whole positions of the QK circuit, ``rank`` or (a pair being two) one fewer, the same for every head:
    the units (``pairs``, and every other position alone) with the largest shares of the scores, at least one
    of each of ``parts`` (position sets that a Slice cuts out, which must not be left empty)."""
    paired = {i for p in pairs for i in p}
    units = [tuple(p) for p in pairs] + [(i,) for i in range(head_dim) if i not in paired]
    share = {}
    for u in units:
        idx = list(u)
        total = 0.0
        for g, heads in enumerate(groups):
            k = ck[g][np.ix_(idx, idx)]
            for h in heads:
                q = cq[h][np.ix_(idx, idx)]
                total += float(np.trace(q) * np.trace(k)) / len(u) if len(u) > 1 else float(q[0, 0] * k[0, 0])
        share[u] = total
    kept, size = [], 0
    for part in parts:          # the best unit of every part first, so that no Slice is left empty
        best = max((u for u in units if set(u) <= set(part)), key=lambda u: share[u], default=None)
        if best is not None and best not in kept:
            kept.append(best)
            size += len(best)
    for u in sorted(units, key=lambda u: (-share[u], u)):
        if u not in kept and size + len(u) <= rank:
            kept.append(u)
            size += len(u)
    keep = sorted(i for u in kept for i in u)
    return HeadDims.select("qk", head_dim, keep, len(groups), sum(len(g) for g in groups))


def fit_ov_select(cz: dict, gram_o: dict, groups, head_dim: int, rank: int, run: int = 16) -> HeadDims:
    """Whole positions of the OV circuit, the same for every head: aligned runs of ``run`` positions (what a
    quantized output projection's rows can be re-packed into without re-quantizing), those whose part of the
    heads' output energy ``tr(C_z[u, u] W_o[u] W_o[u]ᵀ)`` is largest, ``rank`` positions (rounded up to whole
    runs). A quantized model's V and output projection keep their integers: nothing is rotated."""
    run = run if head_dim % run == 0 else 1
    units = [tuple(range(i, i + run)) for i in range(0, head_dim, run)]
    share = {u: sum(float(np.trace(cz[h][np.ix_(u, u)] @ gram_o[h][np.ix_(u, u)])) for hs in groups for h in hs)
             for u in units}
    count = min(len(units), -(-rank // run))
    keep = sorted(i for u in sorted(units, key=lambda u: (-share[u], u))[:count] for i in u)
    return HeadDims.select("ov", head_dim, keep, len(groups), sum(len(g) for g in groups))


def orthonormal(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a = Q R``: (Q as float32, R). The shared side of a circuit is written as ``Q`` and the other side's
    ``B`` as ``B Rᵀ``: the same ``A Bᵀ``, but the cut model's K or V are an orthonormal projection, not a
    whitening that can scale some directions by 10³ (fp32 error grows with that, as an LLM's logits show)."""
    q, r = np.linalg.qr(a)
    return q.astype(np.float32), r


def fit_ov(cz: dict, gram_o: dict, groups, rank: int) -> HeadDims:
    """``cz``: {head: C_z}, ``gram_o``: {head: W_o,h W_o,hᵀ}, ``groups`` as in ``fit_qk``."""
    a, b = {}, {}
    for g, heads in enumerate(groups):
        cs, ci = roots(sum(cz[h] for h in heads))
        gs = roots(sum(gram_o[h] for h in heads))[0]
        u = np.linalg.svd(cs @ gs)[0][:, :rank]
        a[g], _ = orthonormal(ci @ u)       # the same subspace, so the same least-squares B below
        ag = a[g].astype(np.float64)
        for h in heads:
            lhs = ag.T @ cz[h] @ ag
            lhs += np.eye(rank) * RIDGE * max(float(np.trace(lhs)) / rank, 1e-30)
            b[h] = np.linalg.solve(lhs, ag.T @ cz[h]).T.astype(np.float32)
    return HeadDims("ov", a, b)


def circuit_error(dims: HeadDims, cx: dict, cy: dict, groups) -> float:
    """The relative error of ``dims`` on moments ``cx`` (per head: C_q or C_z) and ``cy`` (QK: per KV head
    C_k; OV: per head G): ``Σ tr(Eᵀ C_x E C_y) / Σ tr(C_x C_y)`` over the heads, ``E = I - X``."""
    num = den = 0.0
    for g, heads in enumerate(groups):
        for h in heads:
            ag, bh = dims.a[g].astype(np.float64), dims.b[h].astype(np.float64)
            x = bh @ ag.T if dims.circuit == "qk" else ag @ bh.T
            e = np.eye(len(x)) - x
            y = cy[g] if dims.circuit == "qk" else cy[h]
            num += float(np.trace(e.T @ cx[h] @ e @ y))
            den += float(np.trace(cx[h] @ y))
    return num / den if den > 0 else 0.0


# ------------------------------------------------------------------ the moments of one model
class Moments:
    """Per block, the D x D second moments that the fits read: q of each query head, k of each KV head, the
    context z of each head (from calibration, fit and held-out batches apart, or from the weights alone)
    and ``G = W_o,h W_o,hᵀ`` of each head (always from the weights)."""

    def __init__(self, model, blocks, cal=None, circuits=("qk", "ov"), external_dir=None, select_ov: bool = False):
        self.blocks = {b.index: b for b in blocks}
        self.select_ov = select_ov        # OV as whole positions (``fit_ov_select``): a quantized model
        self.fit: dict = {}
        self.held: dict = {}
        self.gram_o: dict = {}
        self.source = "calibration" if cal is not None else "weights"
        self.held_batches: frozenset = frozenset()
        self.fits: dict = {}          # (block, circuit, rank) -> CircuitFit
        for b in blocks:
            self.gram_o[b.index] = self._gram_o(model, b, external_dir)
        if cal is None:
            for b in blocks:
                self.fit[b.index] = self.held[b.index] = self._from_weights(model, b, circuits, external_dir)
            return
        names = {}
        for b in blocks:
            if "qk" in circuits:
                for role in ("q", "k"):
                    out = projection_output(cal.work, b, role)
                    if out is None and role == "k" and b.projection("k") is None:
                        out = broadcast_key(cal.work, b)      # one K head below its norm: read it there
                        role = "kb"
                    if out is None:        # a fused projection (ORT's Attention): from its input and weights
                        out = projection_input(cal.work, b, role)
                        role = "x"
                    if out is None:
                        raise PlanError(f"block {b.index} ({b.name}): its {role} projection's output is not one "
                                        "tensor of its own, nor its input (a packed or fused projection); --qk-dims "
                                        "cannot be fitted")
                    names[(b.index, role)] = (b, out)
            if "ov" in circuits:
                names[(b.index, "z")] = (b, next(s.context for s in cal.sites if s.block.index == b.index))
        self.held_batches = frozenset(held_out_batches(len(cal.data)))
        fit, held = cal.grams(names, self.held_batches)
        held = held or fit
        for b in blocks:
            self.fit[b.index] = self._split(b, fit, names, model, external_dir)
            self.held[b.index] = self._split(b, held, names, model, external_dir)

    @staticmethod
    def _columns(block, name: str, unit: frozenset, role: str | None = None) -> np.ndarray:
        """The positions of ``unit`` in ``name``; of its ``role`` run alone in a packed projection."""
        t = block.tensor(name)
        u = block.units.index(unit)
        if role is not None and len(set(t.roles) & {"q", "k", "v"}) > 1:
            return np.concatenate([pos for w, pos, r in packed_runs(block, t) if w == u and r == role])
        return np.flatnonzero(np.asarray(t.owner).reshape(-1) == u)

    def _split(self, block, grams: dict, names: dict, model=None, external_dir=None) -> dict:
        """{"q": {head: C}, "k": {kv head: C}, "z": {head: C}} from the whole-width grams of one block (of its
        projections' input ``x`` for q and k where they have no tensor of their own: ``_through``)."""
        out = {}
        if (block.index, "x") in grams:
            out.update(self._through(block, grams[(block.index, "x")], model, external_dir))
        if (block.index, "kb") in grams:          # the one broadcast K head: its moments as they are
            gram, total, n = grams[(block.index, "kb")]
            out["k"] = {0: gram / max(n, 1)}
        for role in ("q", "k", "z"):
            key = (block.index, role)
            if key not in grams:
                continue
            gram, total, n = grams[key]
            gram = gram / max(n, 1)
            if role == "z":     # the mean context, whole width: what a bias shift puts back (the budget)
                out["z_mean"] = total / max(n, 1)
            if role == "k" and not block.selects_dims:
                # a shift of every key adds one number per query to its scores: softmax drops it (not once a
                # rotary embedding turns it by position)
                mean = total / max(n, 1)
                gram = gram - np.outer(mean, mean)
            name = names[key][1]
            units = ([frozenset(g) for g in block.kv_groups] if role == "k"
                     else [frozenset({h}) for h in range(block.num_heads)])
            columns = [self._columns(block, name, u, role if role != "z" else None) for u in units]
            out[role] = {i: gram[np.ix_(c, c)] for i, c in enumerate(columns)}
            if role == "z":
                out["z_heads_mean"] = {i: out["z_mean"][c] for i, c in enumerate(columns)}
        return out

    def _through(self, block, gram_x, model, external_dir) -> dict:
        """q and k moments from the moments of the input x they are projected from: with ``y = x W + b``,
        ``E yyᵀ = Wᵀ E[xxᵀ] W + Wᵀ μ bᵀ + b μᵀ W + b bᵀ`` per head (k centred: ``Wᵀ Σ_x W``, as ``_split``)."""
        gram, total, n = gram_x
        exx, mu = gram / max(n, 1), total / max(n, 1)
        out = {}
        for role in ("q", "k"):
            p = block.projection(role)
            w = np.moveaxis(constant_array(model, p.weight, external_dir).astype(np.float64), p.head_axis, -1)
            b = constant_array(model, p.bias, external_dir).astype(np.float64) if p.bias else None
            units = ([frozenset(g) for g in block.kv_groups] if role == "k"
                     else [frozenset({h}) for h in range(block.num_heads)])
            centred = role == "k" and not block.selects_dims
            moments = exx - np.outer(mu, mu) if centred else exx
            out[role] = {}
            for i, u in enumerate(units):
                wc = w[:, self._columns(block, p.weight, u, role)]
                c = wc.T @ moments @ wc
                if b is not None and not centred:
                    bc = b[self._columns(block, p.bias, u, role)]
                    m = wc.T @ mu
                    c = c + np.outer(m, bc) + np.outer(bc, m) + np.outer(bc, bc)
                out[role][i] = c
        return out

    def _gram_o(self, model, block, external_dir) -> dict:
        return self._weight_grams(model, block, "o", [frozenset({h}) for h in range(block.num_heads)], external_dir,
                                  bias=False)

    def _weight_grams(self, model, block, role: str, units, external_dir, bias: bool = True) -> dict:
        """{i: W_u W_uᵀ (+ b_u b_uᵀ)} of the ``role`` projection's positions of each unit ``units[i]``, its
        weight (and bias) rows on the head axis."""
        p = block.projection(role)
        if p is None:
            raise PlanError(f"block {block.index} ({block.name}): no {role} projection of its own; a cut "
                            "inside its heads needs calibration data (--calib)")
        w = np.moveaxis(constant_array(model, p.weight, external_dir).astype(np.float64), p.head_axis, 0)
        w = w.reshape(w.shape[0], -1)
        b = constant_array(model, p.bias, external_dir).astype(np.float64) if bias and p.bias else None
        out = {}
        for i, u in enumerate(units):
            c = self._columns(block, p.weight, u, role)
            cb = self._columns(block, p.bias, u, role) if b is not None else None
            out[i] = w[c] @ w[c].T + (np.outer(b[cb], b[cb]) if b is not None else 0)
        return out

    def _from_weights(self, model, block, circuits, external_dir) -> dict:
        """Moments of a white input: ``Wᵀ W + b bᵀ`` per head of each projection; the context of a head as
        its V head's (the attention mixes tokens, not the head's positions)."""
        def per(role, units):
            return self._weight_grams(model, block, role, units, external_dir)
        heads = [frozenset({h}) for h in range(block.num_heads)]
        groups = [frozenset(g) for g in block.kv_groups]
        out = {}
        if "qk" in circuits:
            out["q"], out["k"] = per("q", heads), per("k", groups)
        if "ov" in circuits:
            v = per("v", groups)
            out["z"] = {h: v[g] for g, hs in enumerate(block.kv_groups) for h in hs}
        return out

    # ------------------------------------------------------------------ fits
    def fit_circuit(self, index: int, circuit: str, rank: int) -> CircuitFit:
        """Block ``index``'s ``circuit`` fitted at ``rank`` (once: the budget tries ranks that the plan keeps)."""
        key = (index, circuit, rank)
        if key not in self.fits:
            self.fits[key] = self._fit(index, circuit, rank)
        return self.fits[key]

    def _fit(self, index: int, circuit: str, rank: int) -> CircuitFit:
        block = self.blocks[index]
        fit, held = self.fit[index], self.held[index]
        if circuit == "qk" and block.selects_dims:
            parts = {tuple(np.unique(t.dim_pos).tolist()) for t in block.tensors
                     if t.dim_pos is not None and t.roles and set(t.roles) <= {"q", "k"}}
            dims = fit_qk_select(fit["q"], fit["k"], block.kv_groups, block.pairs, block.head_dim, rank,
                                 sorted(parts))
            return CircuitFit(dims, circuit_error(dims, held["q"], held["k"], block.kv_groups))
        if circuit == "qk":
            dims = fit_qk(fit["q"], fit["k"], block.kv_groups, rank)
            return CircuitFit(dims, circuit_error(dims, held["q"], held["k"], block.kv_groups))
        if self.select_ov:          # a quantized model: whole positions, nothing rotated
            dims = fit_ov_select(fit["z"], self.gram_o[index], block.kv_groups, block.head_dim, rank)
        else:
            dims = fit_ov(fit["z"], self.gram_o[index], block.kv_groups, rank)
        return CircuitFit(dims, circuit_error(dims, held["z"], self.gram_o[index], block.kv_groups))
