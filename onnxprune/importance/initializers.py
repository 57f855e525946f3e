"""``initializers``: scores stored in the model by ``onnxprune score`` (``<block>.head_importance`` or one
``[blocks, H]`` table), or named by ``--importance-initializer``. The default when the model has them.

Stored scores are an artefact of the model: ``store_importance`` writes them, ``carry_importance`` keeps
them in a pruned model (following the kept heads) so that it can be pruned again."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, PlanError
from .source import Source

IMPORTANCE_SUFFIX = ".head_importance"     # "<block name>.head_importance": [H], one per block
IMPORTANCE_TABLE = "onnxprune.head_importance"   # or one [num_blocks, H] table for all blocks
IMPORTANCE_METHOD_KEY = "onnxprune.importance_method"   # metadata: how the stored scores were made


def _init_array(proto) -> np.ndarray:
    from onnx import numpy_helper
    return numpy_helper.to_array(proto).astype(np.float64)


def initializer_importance(model, blocks, pattern: str | None = None) -> dict[int, np.ndarray] | None:
    """Scores stored in ``model``: a [num_blocks, H] initializer, or one [H] initializer per block whose name
    holds the block's name (``<block name>.head_importance`` by default). ``pattern`` (a name or a glob)
    picks other initializers: one name is the table; a glob matches one per block, each assigned to the
    block whose name it contains (the longest such), else by position when the counts agree. None when the
    model holds none."""
    from fnmatch import fnmatchcase
    inits = {i.name: i for i in model.graph.initializer}
    if pattern is None:
        if IMPORTANCE_TABLE in inits:
            return _from_table(inits[IMPORTANCE_TABLE], blocks)
        names = [n for n in inits if n.endswith(IMPORTANCE_SUFFIX)]
    elif pattern in inits:
        arr = _init_array(inits[pattern])
        if arr.ndim == 2 or len(blocks) != 1:
            return _from_table(inits[pattern], blocks)
        names = [pattern]
    else:
        names = sorted(n for n in inits if fnmatchcase(n, pattern))
        if not names:
            raise InputError(f"no initializer matches {pattern!r}")
    if not names:
        return None
    out = {}
    for b in blocks:
        mine = [n for n in names if b.name in n]
        if mine:
            out[b.index] = _init_array(inits[max(mine, key=len)]).reshape(-1)
    if len(out) < len(blocks) and len(names) == len(blocks) and not out:
        out = {b.index: _init_array(inits[n]).reshape(-1) for b, n in zip(blocks, names)}
    if len(out) < len(blocks):
        missing = [b.name for b in blocks if b.index not in out]
        raise InputError(f"importance initializers cover {len(out)} of {len(blocks)} blocks; none for "
                         f"{missing[0]!r}")
    for b in blocks:
        if out[b.index].size != b.num_heads:
            raise InputError(f"importance for block {b.index} ({b.name}) has {out[b.index].size} values for "
                             f"{b.num_heads} heads")
    return out


def _from_table(proto, blocks) -> dict[int, np.ndarray]:
    arr = _init_array(proto)
    if arr.ndim != 2 or arr.shape[0] != len(blocks):
        raise InputError(f"importance table {proto.name!r} has shape {list(arr.shape)}; expected "
                         f"[{len(blocks)} blocks, heads]")
    out = {}
    for b in blocks:
        if arr.shape[1] != b.num_heads:
            raise InputError(f"importance table {proto.name!r} has {arr.shape[1]} columns; block {b.index} has "
                             f"{b.num_heads} heads")
        out[b.index] = arr[b.index]
    return out


def store_importance(model, blocks, importance: dict[int, np.ndarray], method: str):
    """Write ``importance`` into ``model`` (in place) as ``<block name>.head_importance`` initializers, and the
    method into the metadata; earlier scores are replaced."""
    from onnx import numpy_helper
    keep = [i for i in model.graph.initializer
            if not (i.name.endswith(IMPORTANCE_SUFFIX) or i.name == IMPORTANCE_TABLE)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for b in blocks:
        model.graph.initializer.append(numpy_helper.from_array(
            np.asarray(importance[b.index], dtype=np.float32), f"{b.name}{IMPORTANCE_SUFFIX}"))
    props = [p for p in model.metadata_props if p.key != IMPORTANCE_METHOD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = IMPORTANCE_METHOD_KEY, method


def carry_importance(original, pruned, blocks, kept: dict[int, tuple]):
    """Stored scores go into the pruned model (in place) following the kept heads, so that it can be pruned
    again; a [num_blocks, H] table that the kept counts no longer fit is left out."""
    from onnx import numpy_helper
    have = {i.name for i in pruned.graph.initializer}
    names = {f"{b.name}{IMPORTANCE_SUFFIX}": b for b in blocks}
    for init in original.graph.initializer:
        if init.name in have or not (init.name in names or init.name == IMPORTANCE_TABLE):
            continue
        arr = numpy_helper.to_array(init)
        if init.name in names:
            b = names[init.name]
            if arr.shape == (b.num_heads,):
                arr = arr[list(kept[b.index])]
        elif arr.ndim == 2 and arr.shape[0] == len(blocks) and len({len(kept[b.index]) for b in blocks}) == 1 \
                and all(arr.shape[1] == b.num_heads for b in blocks):
            arr = np.stack([arr[b.index][list(kept[b.index])] for b in blocks])
        else:
            continue
        pruned.graph.initializer.append(numpy_helper.from_array(arr, init.name))


def stored_method(model) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == IMPORTANCE_METHOD_KEY), None)


def _score(ctx):
    found = initializer_importance(ctx.model, ctx.blocks, ctx.options.importance_initializer)
    if found is None:
        pattern = ctx.options.importance_initializer
        raise PlanError("the model has no importance initializers" + (f" matching {pattern!r}" if pattern else ""))
    return found


SOURCE = Source("initializers", "scores stored in the model (`onnxprune score`); the default when the model "
                "has them", _score, order=80)
