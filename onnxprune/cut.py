"""A cut as linear algebra: what one block keeps, written as maps on the axes of its tensors.

A rewrite keeps, on each head axis of each tensor, a linear image of it: ``new[..., j, ...] = sum_i old[..., i,
...] * M[i, j]``. Keeping heads is the special case of a selection (one 1 per column of ``M``), stored as the
kept positions; a cut inside heads adds a per-head matrix on the head-size positions. ``AxisMap`` holds such a
map as pieces, each a run of old positions and the matrix applied to them (None: kept as they are), so that a
block-diagonal map never becomes a dense one. The rewriter applies these maps to weights, and the reference
that proves the rewrite is built from the same maps (``reference_rows``).

Key: H heads of size D, F = H * D; a head's positions on a merged F axis are the run that it owns.

    V weight [E, F], heads (0, 2) kept of 4, head-size map A_h [D, r] each:
        AxisMap(pieces=((cols of head 0, A_0), (cols of head 2, A_2)))     -> [E, 2r]
    O weight [F, E], the matching rows, B_h [D, r] each:   rows_h -> B_hᵀ W_o,h -> [2r, E]
    the reference: the original, with W_o,h <- A_h B_hᵀ W_o,h (dropped heads: zero), V untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PlanError, RewriteError

CIRCUITS = ("ov", "qk")      # the circuits whose head-size maps the rewriter applies


@dataclass(frozen=True)
class AxisMap:
    """A linear map on one axis, as pieces: (old positions, matrix [len(positions), width] or None to keep
    them as they are). The new axis is the pieces' outputs side by side."""

    pieces: tuple

    @staticmethod
    def select(keep) -> "AxisMap":
        return AxisMap(((np.asarray(keep, dtype=np.int64), None),))

    @property
    def is_selection(self) -> bool:
        return all(m is None for _, m in self.pieces)

    @property
    def keep(self) -> np.ndarray:
        """The kept positions of a selection."""
        assert self.is_selection
        return np.concatenate([p for p, _ in self.pieces]) if self.pieces else np.zeros(0, np.int64)

    @property
    def new_size(self) -> int:
        return sum(len(p) if m is None else m.shape[1] for p, m in self.pieces)

    def apply(self, arr: np.ndarray, axis: int) -> np.ndarray:
        """``arr`` with this map applied along ``axis`` (same dtype)."""
        if self.is_selection:
            return np.take(arr, self.keep, axis=axis)
        parts = []
        for pos, m in self.pieces:
            part = np.take(arr, pos, axis=axis)
            if m is not None:
                moved = np.moveaxis(part, axis, -1).astype(np.float64) @ m.astype(np.float64)
                part = np.moveaxis(moved, -1, axis).astype(arr.dtype)
            parts.append(part)
        return np.concatenate(parts, axis=axis)

    def matrix(self, size: int) -> np.ndarray:
        """The map as one dense matrix [size, new_size] (tests, small tensors)."""
        out = np.zeros((size, self.new_size))
        col = 0
        for pos, m in self.pieces:
            width = len(pos) if m is None else m.shape[1]
            out[pos, col:col + width] = np.eye(len(pos)) if m is None else m
            col += width
        return out


@dataclass(frozen=True)
class HeadDims:
    """A map inside the heads of one circuit: ``a[kv head]`` [D, r] on the first side, the one a KV head shares
    with its query heads (V for ``ov``, K for ``qk``), and ``b[head]`` [D, r] on the second (the output
    projection's rows for ``ov``, Q for ``qk``). What the circuit computes becomes ``x A Bᵀ y``: ``v A Bᵀ W_o``,
    and the scores ``q B Aᵀ kᵀ``. Every head keeps the same r: a tensor that holds the head size on an axis of
    its own ([B, H, S, D]) has one size for all heads."""

    circuit: str
    a: dict = field(compare=False)
    b: dict = field(compare=False)

    @property
    def rank(self) -> int:
        return int(next(iter(self.a.values())).shape[1])

    @staticmethod
    def select(circuit: str, head_dim: int, keep, num_kv_heads: int, num_heads: int) -> "HeadDims":
        """The same positions ``keep`` of every head, on both sides: what passes a rotary embedding (whole pairs
        of positions, which it only turns within)."""
        eye = np.eye(head_dim, dtype=np.float32)[:, np.sort(np.asarray(keep, dtype=np.int64))]
        return HeadDims(circuit, {g: eye for g in range(num_kv_heads)}, {h: eye for h in range(num_heads)})

    @property
    def keep(self) -> np.ndarray | None:
        """The positions kept when every map is the same selection (``select``), else None (a projection)."""
        rows = [selected(m) for m in list(self.a.values()) + list(self.b.values())]
        if any(r is None for r in rows) or any(not np.array_equal(r, rows[0]) for r in rows):
            return None
        return rows[0]


def selected(m) -> np.ndarray | None:
    """The rows that a selection matrix [D, r] keeps (one 1 per column, on ascending rows, zeros elsewhere),
    else None."""
    m = np.asarray(m)
    if m.ndim != 2 or m.shape[1] == 0 or not np.all((m == 0) | (m == 1)) or not np.all(m.sum(axis=0) == 1):
        return None
    rows = m.argmax(axis=0)
    return rows if np.all(np.diff(rows) > 0) else None


@dataclass(frozen=True)
class HeadwiseMap:
    """The head-size axis of a KV cache [B, H_kv, T, D] mapped by each KV head's own matrix (``HeadDims.a``):
    what a cut inside the heads does to the cache that a graph input or output carries. ``matrices``: one
    [D, r] per head left on ``head_axis``, in order."""

    head_axis: int
    matrices: tuple = field(compare=False)

    def apply(self, arr: np.ndarray, axis: int) -> np.ndarray:
        parts = [np.moveaxis(np.moveaxis(np.take(arr, [g], axis=self.head_axis), axis, -1).astype(np.float64) @ m,
                             -1, axis) for g, m in enumerate(self.matrices)]
        return np.concatenate(parts, axis=self.head_axis).astype(arr.dtype)


SIDES = {"ov": ({"v"}, {"o"}), "qk": ({"k"}, {"q"})}    # the roles of the first and the second side of a circuit
WRITTEN = {"ov": "o", "qk": "q"}    # the projection whose weights the reference writes the circuit's A Bᵀ into


def side_of(roles, circuit: str) -> int | None:
    """0 or 1 for a tensor whose roles lie on one side of ``circuit`` only, else None."""
    first, second = SIDES[circuit]
    roles = set(roles)
    if roles and roles <= first:
        return 0
    if roles and roles <= second:
        return 1
    return None


def runs(owner: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(unit, positions) of each contiguous run of one unit along a 1-D owner: [0,0,1,1,-1] gives
    (0, [0,1]), (1, [2,3]), (-1, [4])."""
    owner = np.asarray(owner).reshape(-1)
    starts = np.flatnonzero(np.diff(owner, prepend=owner[0] - 1))
    ends = list(starts[1:]) + [len(owner)]
    return [(int(owner[s]), np.arange(s, e)) for s, e in zip(starts, ends)]


def packed_runs(block, t) -> list[tuple[int, np.ndarray, str | None]]:
    """(unit, positions, role) of each run of a merged head axis; a packed projection ([Q | K | V], or Q, K and
    V of each head side by side) holds a unit's runs in the order q, k, v: three runs of a head of multi-head
    attention, two (k, v) of a KV head serving a group, one (q) of a query head. Role None: no head's, or a
    tensor of one role (its own)."""
    roles = [r for r in ("q", "k", "v") if r in t.roles]
    found = runs(t.owner)
    if len(roles) < 2:
        own = next(iter(t.roles)) if len(t.roles) == 1 else None
        return [(u, pos, own if u >= 0 else None) for u, pos in found]
    d = block.head_dim          # one KV head's K and V side by side ([Q | K | V] of one KV head) form one run
    found = [(u, pos[i:i + d]) for u, pos in found for i in (range(0, len(pos), d) if u >= 0 else (0,))] \
        if all(u < 0 or len(pos) % d == 0 for u, pos in found) else found
    seen: dict = {}
    for u, _ in found:
        seen[u] = seen.get(u, 0) + 1
    out, at = [], {}
    for u, pos in found:
        if u < 0:
            out.append((u, pos, None))
            continue
        k = at.get(u, 0)
        at[u] = k + 1
        n = seen[u]
        heads = block.units[u]
        if n == len(roles):
            order = roles
        elif n == 2 and {"k", "v"} <= set(roles):
            order = ["k", "v"]
        elif n == 1 and "q" in roles and len(heads) == 1 and tuple(heads) not in block.kv_groups:
            order = ["q"]
        elif n == 1:
            raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} holds {'/'.join(roles)} on an axis of "
                            "their own (stacked, as torch's nn.MultiheadAttention does); a cut inside its heads is not "
                            "supported")
        else:
            raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} holds {'/'.join(roles)} together in "
                            "an order that is not q, k, v per head; a cut inside its heads is not supported")
        out.append((u, pos, order[k]))
    return out


def zero_dropped(mask: np.ndarray, pos: np.ndarray, keep) -> None:
    """Zero ``mask`` at the positions ``pos`` of one head's run that ``keep`` (head-size positions) leaves out."""
    inside = np.zeros(len(pos), bool)
    inside[np.asarray(keep, dtype=np.int64)] = True
    mask[pos[~inside]] = 0


def merged_map(owner: np.ndarray, kept_units: set, matrix_of) -> AxisMap:
    """The map of a merged head axis (every head's D positions in one run): each kept unit's run times its
    matrix (``matrix_of(unit)``), positions of no head kept as they are, dropped units gone."""
    pieces = []
    for unit, pos in runs(owner):
        if unit == -1:
            pieces.append((pos, None))
        elif unit in kept_units:
            pieces.append(piece(pos, matrix_of(unit)))
    return AxisMap(tuple(pieces))


def piece(pos: np.ndarray, m: np.ndarray) -> tuple:
    """One piece of an ``AxisMap``: the run ``pos`` times ``m``, or where ``m`` is a selection, the positions it
    keeps as they are (no multiplication, so quantized and shared weights are only sliced)."""
    rows = selected(m)
    return (pos, m) if rows is None else (pos[rows], None)


def reference_rows(rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The second side's rows of one head with the circuit's projection written in: ``A Bᵀ W`` (a
    selection's ``A = B = I[:, keep]`` gives the rows of the kept positions, zeros elsewhere)."""
    return ((a.astype(np.float64) @ b.astype(np.float64).T) @ rows.astype(np.float64)).astype(rows.dtype)


def written(block, circuit: str) -> list:
    """The head tensors that a reference writes ``circuit``'s map into: the weight of its second side's
    projection (``WRITTEN``) and its bias where that holds heads (the output projection's does not); for a QK cut
    that passes RMS q/k norms (``block.norm_means``), K's too, since its norm sees what the cut keeps. Each must
    hold every head's positions in one run of one axis."""
    roles = [WRITTEN[circuit]] + (["k"] if circuit == "qk" and block.norm_means and not block.qk_below("k") else [])
    names = [n for r in roles for p in [block.projection(r)] for n in (p.weight, p.bias)]
    if circuit == "qk":         # a packed [q | k | v] bias that a fused op adds itself (MultiHeadAttention's input 3)
        names += [t.name for t in block.tensors if t.constant and len(t.roles) > 1 and roles[0] in t.roles
                  and len(t.axes) == 1 and t.dim_axis == t.axes[0]]
    out = []
    for name in dict.fromkeys(names):
        t = next((t for t in block.tensors if t.name == name), None) if name is not None else None
        if t is None:
            continue
        if len(t.axes) != 1 or t.dim_axis != t.axes[0]:
            raise PlanError(f"block {block.index} ({block.name}): {name!r} does not hold each head's positions in "
                            "one run of one axis; no reference for a cut inside its heads")
        out.append(t)
    return out


def project_heads(arr: np.ndarray, block, t, kept_heads, dims: HeadDims) -> np.ndarray:
    """``arr``, the value of ``block``'s head tensor ``t`` (one of ``written``), with each kept head's positions
    replaced by ``A_g B_hᵀ`` times them: the circuit's map written into the original weights (a copy)."""
    axis = t.axes[0]
    moved = np.moveaxis(np.array(arr, copy=True), axis, 0)
    role = WRITTEN[dims.circuit]
    side = side_of(t.roles, dims.circuit)
    if side == 0 or (side is None and dims.circuit == "qk" and "k" in t.roles and block.norm_means
                     and not block.qk_below("k")):
        # K through its norm: each kept KV head's positions A Aᵀ (in a packed [Q | K | V] weight, beside Q's)
        rows_of = {u: pos for u, pos, r in packed_runs(block, t) if r in SIDES[dims.circuit][0]}
        for g in block.kept_kv_heads(kept_heads):
            rows = rows_of[block.units.index(frozenset(block.kv_groups[g]))]
            moved[rows] = reference_rows(moved[rows], dims.a[g], dims.a[g])
        if side == 0:
            return np.ascontiguousarray(np.moveaxis(moved, 0, axis))
    rows_of = {u: pos for u, pos, r in packed_runs(block, t) if r == role}
    for h in kept_heads:
        rows = rows_of[block.units.index(frozenset({h}))]
        group = next(g for g, hs in enumerate(block.kv_groups) if h in hs)
        moved[rows] = reference_rows(moved[rows], dims.a[group], dims.b[h])
    return np.ascontiguousarray(np.moveaxis(moved, 0, axis))


def qk_passes(block) -> bool:
    """Whether a map of the QK circuit can pass every query and key tensor of ``block``: each has a head-size
    axis that the matcher followed (a norm over the head size mixes its positions), or is an RMS q/k norm's mean
    square that the cut rescales (``block.norm_means``). Through a rotary embedding only a selection passes
    (``block.selects_dims``); below q/k norms it starts there (``block.cut_points``), where a cut written into
    W_q cannot stand for it."""
    return not block.qk_below("q") and all(t.constant or t.dim_axis is not None or block.norm_means
                                           for t in block.tensors if t.roles and set(t.roles) <= {"q", "k"})
