"""What a cut does to each tensor of a block: its map per head axis and its new shape (``Layout``), and the
small array helpers the rewriter and its site planners share."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..block import AttentionBlock
from ..cut import SIDES, AxisMap, HeadDims, merged_map, packed_runs, piece, side_of
from ..errors import PlanError, RewriteError

fresh = itertools.count()


@dataclass
class Layout:
    """Per tensor: the map on each head axis (``cut.AxisMap``: a selection of the kept positions, or with a
    cut inside the heads a projection), and the new shape (a head-size axis of its own changes size only)."""

    maps: dict[int, AxisMap]
    new_shape: tuple
    fixed: frozenset = frozenset()   # head axes whose size is the same at any batch size (no B*H merge)

    @property
    def keep(self) -> dict[int, np.ndarray]:
        """The kept positions of every selected head axis: what sites that pick positions read."""
        return {ax: m.keep for ax, m in self.maps.items() if m.is_selection}

    @property
    def projected(self) -> set[int]:
        """Head axes mapped by a projection inside the heads (no positions to pick there)."""
        return {ax for ax, m in self.maps.items() if not m.is_selection}


def kept_units(block: AttentionBlock, kept_heads) -> set[int]:
    kept = set(kept_heads)
    return {u for u, heads in enumerate(block.units) if heads & kept}


def layouts(block: AttentionBlock, kept_heads, dims: tuple, shapes) -> dict[str, Layout]:
    """Every head tensor's ``Layout`` when ``block`` keeps ``kept_heads``: their positions, and each circuit's
    map inside them (``dims``: ``cut.HeadDims``) on the tensors of its two sides."""
    units = kept_units(block, kept_heads)
    for d in dims:
        check_positions(block, d)
    out = {}
    for t in block.tensors:
        mask = (t.owner == -1) | np.isin(t.owner, list(units))
        keep, ok = {}, True
        for pos, ax in enumerate(t.axes):
            if ax in t.copies and mask.ndim > 1:
                # entries along a broadcast axis are copies: keep as many as each row needs. Rows that keep
                # nothing (a whole KV group dropped) go along the other axes, so only kept rows must agree
                sums = mask.sum(axis=pos)
                counts = np.unique(sums[sums > 0])
                ok &= len(counts) == 1
                keep[ax] = np.arange(int(counts[0]) if len(counts) else 0)
                continue
            # a single head axis keeps its heads' own positions, copies or not: on a B*H axis they repeat
            # with period H, which lets a Gather outside the block hold at every batch size (DeBERTa-v2's
            # relative-position indices, expanded to B*H and shared by the blocks)
            other = tuple(i for i in range(mask.ndim) if i != pos)
            keep[ax] = np.flatnonzero(mask.any(axis=other) if other else mask)
        proj = mask
        for pos in sorted((t.axes.index(a) for a in t.copies), reverse=True):
            proj = proj.any(axis=pos)
        plain = [ax for ax in t.axes if ax not in t.copies]
        grid = np.zeros(proj.shape, dtype=bool)
        if plain:
            grid[np.ix_(*[keep[ax] for ax in plain])] = True
        if not ok or (plain and not np.array_equal(grid, proj)):
            if 1 < block.num_kv_heads < block.num_heads:
                hint = "in grouped-query attention keep the same number of query heads in every KV group"
            else:
                hint = (f"it holds the heads in a {' x '.join(str(n) for n in np.shape(t.owner))} grid (CodeGen "
                        "packs them so): keep the same heads in every row of it")
            raise PlanError(f"block {block.index} ({block.name}): the kept heads {list(kept_heads)} cannot be "
                            f"cut out of {t.name!r} as a rectangle; {hint}")
        shape = list(shapes[t.name])
        for ax, idx in keep.items():
            shape[ax] = len(idx)
        maps = {ax: AxisMap.select(idx) for ax, idx in keep.items()}
        if len(set(t.roles) & {"q", "k", "v"}) > 1 and t.dim_axis is not None and t.dim_axis in t.axes \
                and dims:
            _inside_packed(block, t, dims, units, maps, shape)
        else:
            for d in dims:
                _inside_heads(block, t, d, units, maps, shape)
        fixed = frozenset(t.axes) if len(t.axes) == 1 and one_run_per_unit(t.owner) else frozenset()
        out[t.name] = Layout(maps, tuple(shape), fixed)
    return out


# why a tensor on a side of a circuit has no head-size axis, as the refusal says it
UNFOLLOWED = {
    "ov": "carries values (or their context) with no head-size axis that the matcher could follow; its OV circuit "
          "cannot be cut by a map",
    "qk": "has no head-size axis that the matcher could follow (a norm over the head size mixes its positions, as "
          "q/k norms do, or an op it does not follow); its QK circuit cannot be cut by a map (cut --v-dims only)",
}


def _inside_packed(block: AttentionBlock, t, dims: tuple, units: set, maps: dict, shape: list):
    """A packed projection's merged axis (``cut.packed_runs``): each kept run of a role on a side of a circuit
    times that side's matrix (K and V: their KV head's ``A``; Q: its head's ``B``), the other runs as they are."""
    by_role = {}
    for d in dims:
        first, second = SIDES[d.circuit]
        for role in first:
            by_role[role] = (d, 0)
        for role in second:
            by_role[role] = (d, 1)
    ax = t.dim_axis
    pieces = []
    for unit, pos, role in packed_runs(block, t):
        if unit != -1 and unit not in units:
            continue
        if role not in by_role:
            pieces.append((pos, None))
            continue
        d, side = by_role[role]
        pieces.append(piece(pos, unit_matrix(block, t, d, side, unit)))
    maps[ax] = AxisMap(tuple(pieces))
    shape[ax] = maps[ax].new_size


def _inside_heads(block: AttentionBlock, t, dims: HeadDims, units: set, maps: dict, shape: list):
    """Add ``dims``'s map to tensor ``t``'s ``maps`` and ``shape`` when ``t`` lies on one side of its circuit:
    on a merged head axis each kept head's run times its matrix; on a head-size axis of its own, the rank."""
    first, second = SIDES[dims.circuit]
    side = side_of(t.roles, dims.circuit)
    if t.before_cut and dims.circuit == "qk" and dims.keep is not None:
        return                  # above a q/k norm: whole; the cut starts below it (``block.cut_points``)
    if side is None:
        if set(t.roles) & (first | second) and len(set(t.roles) & {"q", "k", "v"}) > 1:
            raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} holds {'/'.join(sorted(t.roles))} "
                               f"together (a packed projection); a cut inside its heads is not supported")
        return
    if t.dim_axis is None and dims.circuit == "qk" and (block.cut_points or block.norm_means) and not t.constant:
        return                  # a q/k norm's mean square ([..., 1]): as it is
    if t.dim_axis is None:
        if t.constant:
            raise RewriteError(f"block {block.index} ({block.name}): no head-size axis known for {t.name!r}")
        raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} {UNFOLLOWED[dims.circuit]}")
    if t.dim_axis not in t.axes:          # [B, H, S, D]: one size for every head
        if t.constant:
            raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} holds the head size on an axis "
                               "of its own, which one map per head cannot be written into")
        keep = dims.keep
        if keep is None:
            if t.dim_pos is not None:
                raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} is a part of the head size "
                                   f"(a rotary embedding's half); {ROTATION}")
            shape[t.dim_axis] = dims.rank
            return
        pos = np.arange(shape[t.dim_axis]) if t.dim_pos is None else np.asarray(t.dim_pos)
        if pos.size == 0:          # an empty part (a full rotary's pass-through, x[..., D:]): stays empty
            return
        inside = np.isin(pos.reshape(len(pos), -1), keep)
        if not np.all(inside.all(axis=1) | ~inside.any(axis=1)):
            raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} interleaves head-size positions "
                               "that the cut keeps with ones that it drops")
        maps[t.dim_axis] = AxisMap.select(np.flatnonzero(inside.all(axis=1)))
        shape[t.dim_axis] = int(inside.all(axis=1).sum())
        if shape[t.dim_axis] == 0:
            raise RewriteError(f"block {block.index} ({block.name}): the cut keeps none of the head-size positions "
                               f"of {t.name!r} (a rotary embedding's part of the head size); keep some of each part")
        return

    ax = t.dim_axis
    maps[ax] = merged_map(t.owner, units, lambda unit: unit_matrix(block, t, dims, side, unit))
    shape[ax] = maps[ax].new_size


def unit_matrix(block: AttentionBlock, t, dims: HeadDims, side: int, unit: int) -> np.ndarray:
    """The matrix of ``dims`` for the run of ``unit`` in tensor ``t``: on the first side its KV head's ``A``,
    on the second its head's ``B``."""
    heads = block.units[unit]
    if side == 0:
        group = next((g for g, hs in enumerate(block.kv_groups) if set(hs) == set(heads)), None)
        if group is None or group not in dims.a:
            raise RewriteError(f"block {block.index} ({block.name}): no map for the KV head of heads "
                               f"{sorted(heads)} in {t.name!r}")
        m = dims.a[group]
    else:
        if len(heads) != 1 or next(iter(heads)) not in dims.b:
            raise RewriteError(f"block {block.index} ({block.name}): no map for heads {sorted(heads)} in "
                               f"{t.name!r}")
        m = dims.b[next(iter(heads))]
    if m.shape[0] != block.head_dim or m.shape[1] != dims.rank:
        raise RewriteError(f"block {block.index} ({block.name}): a head-size map must be [{block.head_dim}, "
                           f"{dims.rank}], got {list(m.shape)}")
    return m


ROTATION = ("a map that mixes head-size positions cannot pass a rotary embedding, which turns them pair by pair; "
            "only whole positions (its pairs) can be kept there")


def check_positions(block: AttentionBlock, dims: HeadDims):
    """A cut of a circuit that a rotary embedding turns keeps whole pairs of positions, and no projection."""
    side = SIDES[dims.circuit][0] | SIDES[dims.circuit][1]
    mine = [t for t in block.tensors if t.roles and set(t.roles) <= side]
    lost = next((t for t in mine if t.dim_axis is None and not t.constant), None)
    if lost is not None and dims.circuit == "qk" and (block.cut_points or block.norm_means):
        if dims.keep is None:
            where = "through the norm (its weight is per position)" if block.norm_means else "below the norm"
            raise RewriteError(f"block {block.index} ({block.name}): its queries and keys pass a norm over the head "
                               f"size (q/k norms): a QK cut there keeps whole positions {where}; a rotation "
                               "cannot pass it")
        lost = None          # a norm's own tensors ([..., 1]): the cut starts below the norm
    if dims.circuit == "qk" and block.norm_means and dims.keep is None:       # a fused RMS q/k norm
        raise RewriteError(f"block {block.index} ({block.name}): its queries and keys pass a norm over the head "
                           "size (q/k norms): a QK cut there keeps whole positions through the norm (its weight is "
                           "per position); a rotation cannot pass it")
    if lost is not None:     # a norm over the head size on the way: no map passes, whatever it is
        raise RewriteError(f"block {block.index} ({block.name}): {lost.name!r} {UNFOLLOWED[dims.circuit]}")
    turned = any(t.dim_pos is not None for t in mine)
    if not (turned or (dims.circuit == "qk" and block.selects_dims)):
        return
    keep = dims.keep
    if keep is None:
        raise RewriteError(f"block {block.index} ({block.name}): its {dims.circuit.upper()} circuit: {ROTATION}")
    kept = set(keep.tolist())
    split = next((p for p in block.pairs if kept & set(p) and not set(p) <= kept), None)
    if split is not None:
        raise RewriteError(f"block {block.index} ({block.name}): the cut keeps part of the rotary pair "
                           f"{list(split)} of head-size positions; keep both or neither")


def one_run_per_unit(owner: np.ndarray) -> bool:
    """Every unit's entries sit in one contiguous run: [0,0,1,1,2,2] yes; B*H's [0,1,0,1] no."""
    starts = np.flatnonzero(np.diff(owner, prepend=owner[0] - 1))
    units = owner[starts]
    units = units[units != -1]
    return len(units) == len(np.unique(units))


def apply_maps(arr: np.ndarray, maps: dict[int, AxisMap]) -> np.ndarray:
    """``arr`` with each axis's map applied (a selection takes the kept positions)."""
    for ax, m in maps.items():
        arr = m.apply(arr, ax)
    return np.ascontiguousarray(arr)


def reroute(old, new, node_names):
    """Make the named consumers of ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        if consumer.name in node_names:
            for i, inp in enumerate(consumer.inputs):
                if inp is old:
                    consumer.inputs[i] = new


def period(keep: np.ndarray, size: int) -> int | None:
    """The shortest period P < size with which the kept positions repeat along the axis, else None."""
    mask = np.zeros(size, dtype=bool)
    mask[keep] = True
    for p in range(1, size):
        if size % p == 0 and mask[:p].any() and np.array_equal(np.tile(mask[:p], size // p), mask):
            return p
    return None


def declare_shape(tensor, new_shape):
    """A graph input/output keeps its symbolic sizes; only the fixed sizes that changed are rewritten."""
    if tensor.shape is None:
        return
    tensor.shape = [new if isinstance(old, int) and old != new else old
                    for old, new in zip(tensor.shape, new_shape)]


def new_positions(keep: np.ndarray, size: int) -> np.ndarray:
    """old index -> new index after keeping ``keep`` (-1 where dropped)."""
    pos = np.full(size, -1, dtype=np.int64)
    pos[keep] = np.arange(len(keep))
    return pos
