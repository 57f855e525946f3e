"""Which heads to keep: exact keep counts, top-k selection, per-block plans.

Keep counts are computed in exact rational arithmetic. ``ratio`` is read the way a person writes it
(``0.8`` means 8/10, not the binary float just below it), so ``floor(10 * (1 - 0.8))`` is 2, where
``int(10 * (1 - 0.8))`` in floating point gives 1.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, PlanError
from .files import read_json
from .model.graph import identity_source


def exact_ratio(ratio: float | str | Fraction | Decimal) -> Fraction:
    """``ratio`` as an exact fraction in [0, 1], read from its shortest decimal form."""
    if isinstance(ratio, bool):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    try:
        if isinstance(ratio, Fraction):
            frac = ratio
        elif isinstance(ratio, float):
            if not math.isfinite(ratio):
                raise ValueError
            frac = Fraction(Decimal(repr(ratio)))
        else:
            frac = Fraction(Decimal(str(ratio).strip()))
    except (ValueError, InvalidOperation, TypeError, OverflowError):     # OverflowError: "inf"
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
    if not 0 <= frac <= 1:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    return frac


def keep_count(num_heads: int, ratio, min_heads: int = 1) -> int:
    """``max(min_heads, floor(num_heads * (1 - ratio)))``, capped at ``num_heads``; exact."""
    frac = exact_ratio(ratio)
    if num_heads < 1:
        raise ValueError(f"a block needs at least one head, got {num_heads}")
    if min_heads < 0:
        raise ValueError(f"min_heads must be >= 0, got {min_heads}")
    keep = math.floor(num_heads * (1 - frac))
    return min(num_heads, max(keep, min_heads))


def _check_importance(importance) -> np.ndarray:
    scores = np.asarray(importance, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"importance must be a non-empty 1-D sequence, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"importance must be finite; head {bad} has {scores[bad]}")
    return scores


def top_heads(scores: Sequence[float], k: int) -> list[int]:
    """The ``k`` highest scores, ties to the lower index, returned in ascending index order."""
    scores = np.asarray(scores, dtype=np.float64)
    order = sorted(range(len(scores)), key=lambda h: (-scores[h], h))
    return sorted(order[:k])


def select_heads(importance, ratio, min_heads: int = 1) -> list[int]:
    """Indices of the heads to keep, in ascending order.

    >>> select_heads([0.8, 0.3, 0.9, 0.2], 0.5)
    [0, 2]
    """
    scores = _check_importance(importance)
    return top_heads(scores, keep_count(len(scores), ratio, min_heads))


def prune_attention_heads(attn, importance, ratio, min_heads: int = 1) -> tuple[np.ndarray, list[int]]:
    """Keep the most important heads of a per-head tensor ``attn`` of shape (H, S, S).

    Returns ``(attn[kept], kept)``.
    """
    arr = np.asarray(attn)
    if arr.ndim != 3:
        raise ValueError(f"attn must be 3-D (heads, seq, seq), got {arr.ndim}-D shape {arr.shape}")
    scores = _check_importance(importance)
    if len(scores) != arr.shape[0]:
        raise ValueError(f"importance has {len(scores)} entries but attn has {arr.shape[0]} heads")
    kept = select_heads(scores, ratio, min_heads)
    return arr[kept], kept


@dataclass(frozen=True)
class BlockPlan:
    """The heads one block keeps, in the original numbering."""

    kept_heads: tuple[int, ...]
    min_heads_applied: bool = False   # True when min_heads overrode the ratio
    dims: tuple = ()                  # maps inside the kept heads (``cut.HeadDims``), one per circuit


GQA_MODES = ("uniform", "group")


def keep_rank(head_dim: int, ratio, multiple_of: int | None = None) -> int:
    """Head-size positions a circuit keeps when ``ratio`` of them go: ``floor(D * (1 - ratio))``, at least 1,
    rounded up to a multiple of ``multiple_of`` (at most D); the same arithmetic as heads."""
    r = max(1, math.floor(head_dim * (1 - exact_ratio(ratio))))
    if multiple_of:
        r = min(head_dim, -(-r // multiple_of) * multiple_of)
    return r


def plan_block(importance, ratio, groups: Sequence[Sequence[int]], min_heads: int = 1,
               gqa: str = "uniform") -> BlockPlan:
    """Plan one block. ``groups`` lists the query heads of each KV head (one group per head for MHA).

    With several KV groups (GQA):

    * ``uniform`` keeps the same number of query heads in every group and all KV heads, so that the
      repeat of K/V stays valid;
    * ``group`` keeps ``floor(Hkv * (1 - ratio))`` whole groups, a KV head with all its query heads, ranked
      by the summed importance of their query heads. That is what makes a KV cache smaller.

    Multi-head (one head per group) and multi-query (one group) attention lose query heads one by one in
    both modes.
    """
    if gqa not in GQA_MODES:
        raise PlanError(f"unknown GQA mode {gqa!r}; use one of {', '.join(GQA_MODES)}")
    scores = _check_importance(importance)
    num_heads = len(scores)
    if sorted(h for g in groups for h in g) != list(range(num_heads)):
        raise PlanError(f"KV groups {groups} do not partition {num_heads} heads")
    sizes = {len(g) for g in groups}
    if len(groups) == num_heads or len(groups) == 1:
        want = math.floor(num_heads * (1 - exact_ratio(ratio)))
        keep = keep_count(num_heads, ratio, min_heads)
        return BlockPlan(tuple(top_heads(scores, keep)), keep > want)
    if len(sizes) != 1:
        raise PlanError(f"KV groups of unequal size {sorted(sizes)}")
    per_group = sizes.pop()
    if gqa == "group":
        want = math.floor(len(groups) * (1 - exact_ratio(ratio)))
        keep = min(len(groups), max(want, -(-min_heads // per_group), 1))
        group_scores = np.array([sum(scores[h] for h in g) for g in groups])
        kept_groups = top_heads(group_scores, keep)
        return BlockPlan(tuple(sorted(h for i in kept_groups for h in groups[i])), keep > want)
    want = math.floor(per_group * (1 - exact_ratio(ratio)))
    keep = min(per_group, max(want, -(-min_heads // len(groups))))
    kept: list[int] = []
    for g in groups:
        g = list(g)
        kept += [g[i] for i in top_heads(scores[g], keep)]
    return BlockPlan(tuple(sorted(kept)), keep > want)


def align_heads(kept: Sequence[int], importance, groups: Sequence[Sequence[int]], head_dim: int,
                multiple_of: int, gqa: str = "uniform") -> tuple[int, ...]:
    """Round a plan's head count up so that ``kept * head_dim`` is a multiple of ``multiple_of``.

    The heads added are the best of those dropped, in the plan's own units (a head, a whole KV group in
    ``group`` mode, one head per group in ``uniform`` GQA mode). When no count up to every head is aligned,
    that is a ``PlanError``: keeping every head would not be aligned either."""
    if multiple_of < 1:
        raise PlanError(f"--multiple-of must be at least 1, got {multiple_of}")
    scores = _check_importance(importance)
    num_heads = len(scores)
    chosen = set(kept)
    if len(groups) in (1, num_heads) or gqa == "group":
        units = [[h] for h in range(num_heads)] if len(groups) in (1, num_heads) else [list(g) for g in groups]
        step = len(units[0])
        rest = sorted((u for u in units if not chosen & set(u)),
                      key=lambda u: (-sum(scores[h] for h in u), min(u)))
    else:            # uniform: one more head in every group at a time, so the groups stay the same size
        step = len(groups)
        best = [sorted((h for h in g if h not in chosen), key=lambda h: (-scores[h], h)) for g in groups]
        rest = [list(row) for row in zip(*best)]
    target = next((c for c in range(len(chosen), num_heads + 1, step) if (c * head_dim) % multiple_of == 0),
                  None)
    if target is None:
        raise PlanError(f"no count of heads from the {len(chosen)} planned up to all {num_heads} makes a width "
                        f"(heads x head size {head_dim}) that is a multiple of {multiple_of}")
    for u in rest:
        if len(chosen) >= target:
            break
        chosen.update(u)
    return tuple(sorted(chosen))


SCOPES = ("layer", "global")


def _units(scores: np.ndarray, groups, gqa: str) -> list[tuple[int, ...]]:
    """What is kept or dropped as a whole: single heads, or whole KV groups in ``group`` mode."""
    if len(groups) in (1, len(scores)):
        return [(h,) for h in range(len(scores))]
    if gqa == "group":
        return [tuple(g) for g in groups]
    raise PlanError("--scope global and --threshold keep whole KV groups or single heads; a grouped-query "
                    "block needs --gqa group")


def plan_model(importance: dict[int, np.ndarray], groups: dict[int, Sequence[Sequence[int]]], *, ratio=None,
               threshold: float | None = None, min_heads: int = 1, gqa: str = "uniform"
               ) -> dict[int, BlockPlan]:
    """Plan all blocks together: ``ratio`` ranks every head of every block at once (global scope), or
    ``threshold`` keeps each head whose score reaches it. Scores are normalised per block for the global
    ranking (divided by their L2 norm, as Michel et al. (2019) do), so that blocks whose scores differ in
    scale compete fairly; a threshold reads them raw, as learned gate values are. Either way every block
    keeps at least ``min_heads`` heads (its best ones), and at least one. A KV group counts by its summed
    score (ratio) or its mean score (threshold)."""
    if (ratio is None) == (threshold is None):
        raise PlanError("give one of ratio or threshold")
    if gqa not in GQA_MODES:
        raise PlanError(f"unknown GQA mode {gqa!r}; use one of {', '.join(GQA_MODES)}")
    entries = []        # (normalised score, block, unit index)
    units, floors = {}, {}
    for b, raw in importance.items():
        scores = _check_importance(raw)
        units[b] = _units(scores, groups[b], gqa)
        unit_scores = np.array([scores[list(u)].sum() if ratio is not None else scores[list(u)].mean()
                                for u in units[b]])
        if ratio is not None:
            norm = np.linalg.norm(unit_scores)
            unit_scores = unit_scores / norm if norm > 0 else unit_scores
        size = len(units[b][0])
        floors[b] = min(len(units[b]), max(1, -(-min_heads // size)))
        entries += [(float(s), b, i) for i, s in enumerate(unit_scores)]
    chosen: dict[int, set] = {b: set() for b in units}
    by_block: dict[int, list] = {}
    for s, b, i in entries:
        by_block.setdefault(b, []).append((s, i))
    floor_units = {b: [i for _, i in sorted(lst, key=lambda e: (-e[0], e[1]))[:floors[b]]]
                   for b, lst in by_block.items()}
    for b, idx in floor_units.items():        # the floor of every block first: its best units
        chosen[b].update(idx)
    if ratio is not None:
        total = sum(len(u) for u in units.values())
        want = math.floor(total * (1 - exact_ratio(ratio)))
        have = sum(len(c) for c in chosen.values())
        ranked = sorted(entries, key=lambda e: (-e[0], e[1], e[2]))
        for s, b, i in ranked:
            if have >= want:
                break
            if i not in chosen[b]:
                chosen[b].add(i)
                have += 1
        top = {(b, i) for _, b, i in ranked[:want]}         # what the ranking alone would keep
        floor_only = {b: any((b, i) not in top for i in floor_units[b]) for b in units}
    else:
        for s, b, i in entries:
            if s >= threshold:
                chosen[b].add(i)
        floor_only = {b: sum(1 for s, i in by_block[b] if s >= threshold) < floors[b] for b in units}
    return {b: BlockPlan(tuple(sorted(h for i in chosen[b] for h in units[b][i])), floor_only[b])
            for b in units}


def load_heads_to_prune(path: str | Path) -> dict[int, list[int]]:
    """``{"<block index>": [head, ...]}`` (heads to remove), blocks counted as ``inspect`` lists them.
    Block and head ranges are checked against the matched blocks by ``check_heads_to_prune``."""
    data = read_json(Path(path), "a heads file")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object {{\"<block index>\": [head, ...]}}")
    out = {}
    for key, heads in data.items():
        try:
            b = int(key)
        except ValueError:
            raise InputError(f"{path}: block key {key!r} is not an integer") from None
        if not isinstance(heads, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
            raise InputError(f"{path}: block {b}: expected a list of head indices")
        if b in out:
            raise InputError(f"{path}: block {b} is named twice")
        out[b] = sorted(set(heads))
    return out


def check_heads_to_prune(heads_to_prune: dict[int, list[int]], blocks):
    for b, heads in heads_to_prune.items():
        if not 0 <= b < len(blocks):
            raise InputError(f"heads to prune: block {b} does not exist (the model has {len(blocks)} blocks)")
        bad = [h for h in heads if not 0 <= h < blocks[b].num_heads]
        if bad:
            raise InputError(f"heads to prune: block {b} has {blocks[b].num_heads} heads; no head {bad[0]}")


def plan_blocks(blocks, scores: dict, graph, options, gqa: str) -> dict[int, BlockPlan]:
    """Every block's plan from ``options`` (a ratio, a threshold, lists of heads to keep or to remove):
    planned per layer or globally, blocks that share weights tied, heads held in a grid kept as a rectangle
    of it, and counts rounded to ``options.multiple_of``. ``graph``: the model's graphsurgeon graph (which
    blocks share weights); ``gqa``: ``uniform`` or ``group``."""
    if not scores and options.ratio is not None and exact_ratio(options.ratio) == 0:
        return {b.index: BlockPlan(tuple(range(b.num_heads))) for b in blocks}    # unscored (dims alone)
    shared = shared_blocks(blocks, graph)
    scores = _shared_scores(blocks, shared, scores)
    plans, applied = {}, {}
    if options.heads_to_prune is not None:
        check_heads_to_prune(options.heads_to_prune, blocks)
    if options.threshold is not None or (options.ratio is not None and options.scope == "global"):
        try:
            joint = plan_model(scores, {b.index: b.kv_groups for b in blocks}, ratio=options.ratio,
                            threshold=options.threshold, min_heads=options.min_heads, gqa=gqa)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        for b in blocks:
            plans[b.index], applied[b.index] = joint[b.index].kept_heads, joint[b.index].min_heads_applied
    for b in blocks:
        if b.index in plans:
            continue
        if options.ratio is not None:
            try:
                bp = plan_block(scores[b.index], options.ratio, b.kv_groups, options.min_heads, gqa)
            except ValueError as exc:
                raise PlanError(f"block {b.index} ({b.name}): {exc}") from None
            plans[b.index], applied[b.index] = bp.kept_heads, bp.min_heads_applied
        elif options.kept is not None:
            plans[b.index], applied[b.index] = tuple(sorted(set(options.kept.get(b.index, range(b.num_heads))))), False
        else:
            drop = set(options.heads_to_prune.get(b.index, ()))
            plans[b.index], applied[b.index] = tuple(h for h in range(b.num_heads) if h not in drop), False
    if options.selects_by_score:
        plans, applied = _tie_shared(blocks, shared, plans, applied)
        for b in blocks:
            rows = head_grid(b)
            if rows is not None:
                plans[b.index] = fit_grid(plans[b.index], rows, scores[b.index])
    if options.multiple_of is not None:
        for b in blocks:
            try:
                plans[b.index] = align_heads(plans[b.index], scores[b.index], b.kv_groups, b.head_dim,
                                        options.multiple_of, gqa)
            except (PlanError, ValueError) as exc:
                raise PlanError(f"--multiple-of {options.multiple_of}: block {b.index} ({b.name}): {exc}") from None
    return {b.index: BlockPlan(plans[b.index], applied[b.index]) for b in blocks}


def head_grid(block) -> list[list[int]] | None:
    """The heads as rows of a grid, when a tensor of ``block`` holds them on two axes (CodeGen packs q, k and
    v per shard: shards x heads of a shard). The kept heads must then be a rectangle of it: the same
    positions in every kept row. None for every other layout."""
    for t in block.tensors:
        if len(t.axes) != 2 or t.copies:
            continue
        rows = []
        for row in np.asarray(t.owner):
            heads = []
            for u in row:
                if u < 0 or len(block.units[u]) != 1:
                    continue
                h = next(iter(block.units[u]))
                if h not in heads:
                    heads.append(h)
            rows.append(heads)
        if len(rows) > 1 and len(rows[0]) > 1 and all(len(r) == len(rows[0]) for r in rows) \
                and sorted(h for r in rows for h in r) == list(range(block.num_heads)):
            return rows
    return None


def fit_grid(kept: tuple, rows: list[list[int]], scores) -> tuple:
    """``kept`` if it is a rectangle of the grid ``rows``; else the rectangle of the same size (or, where
    none has it, of the next size that one has) with the highest total score, ties to the lower heads."""
    kept_rows = [r for r in rows if set(r) & set(kept)]
    cols = [tuple(i for i, h in enumerate(r) if h in kept) for r in kept_rows]
    if len(set(cols)) == 1 and sum(len(c) for c in cols) == len(kept):
        return kept
    n_rows, n_cols = len(rows), len(rows[0])
    for size in range(len(kept), n_rows * n_cols + 1):
        best = None
        for r in range(1, n_rows + 1):
            if size % r or size // r > n_cols:
                continue
            for rs in itertools.combinations(range(n_rows), r):
                for cs in itertools.combinations(range(n_cols), size // r):
                    heads = tuple(sorted(rows[i][j] for i in rs for j in cs))
                    key = (-sum(float(scores[h]) for h in heads), heads)
                    if best is None or key < best[0]:
                        best = (key, heads)
        if best is not None:
            return best[1]
    return tuple(range(n_rows * n_cols))


def shared_blocks(blocks, graph) -> list[list[int]]:
    """Groups of blocks (indices) that read one weight or bias between them (ALBERT shares one layer across
    all of them; TorchScript shares equal weights through Identity), each group with at least two."""
    if graph is None:
        return []
    tensors = graph.tensors()
    owner: dict[str, int] = {}
    parent = {b.index: b.index for b in blocks}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for b in blocks:
        for t in b.tensors:
            if not t.constant or t.name not in tensors:
                continue
            src = identity_source(tensors[t.name])
            if src.name in owner:
                parent[find(b.index)] = find(owner[src.name])
            else:
                owner[src.name] = b.index
    groups: dict[int, list[int]] = {}
    for b in blocks:
        groups.setdefault(find(b.index), []).append(b.index)
    return [g for g in groups.values() if len(g) > 1]


def _shared_scores(blocks, shared: list[list[int]], scores: dict) -> dict:
    """Blocks that share weights will keep the same heads: each is planned on the mean of their scores
    (each block's scores normalised first), so that every layer that runs the weights has its say."""
    if not scores:
        return scores
    out = dict(scores)
    by_index = {b.index: b for b in blocks}
    for group in shared:
        same = [i for i in group if by_index[i].num_heads == by_index[group[0]].num_heads]
        if len(same) > 1:
            mean = np.mean([scores[i] / (np.linalg.norm(scores[i]) or 1.0) for i in same], axis=0)
            for i in same:
                out[i] = mean
    return out


def _tie_shared(blocks, shared: list[list[int]], plans, applied):
    """Blocks that share weights keep the same heads, so that one slice of the shared weights serves them
    all: each takes the plan of the first block of its group, made on the group's mean scores
    (``_shared_scores``). (Lists of heads given by hand stay as given;
    blocks that keep different heads then each get a slice of their own.)"""
    by_index = {b.index: b for b in blocks}
    for group in shared:
        first = by_index[group[0]]
        for i in group[1:]:
            if by_index[i].num_heads == first.num_heads and by_index[i].kv_groups == first.kv_groups:
                plans[i], applied[i] = plans[first.index], applied[first.index]
    return plans, applied
