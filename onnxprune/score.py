"""Head importance. Data-free default: how much each head can write into the residual stream, measured
on the weights as ||W_v (the head's KV columns)|| * ||W_o (the head's rows)||. Explicit lists come in the
Hugging Face ``heads_to_prune`` form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from .block import AttentionBlock
from .errors import InputError
from .match.headflow import const_value


def _norms(block: AttentionBlock, graph_tensors, weight: str, heads_of_unit) -> np.ndarray:
    t = block.tensor(weight)
    value = np.asarray(const_value(graph_tensors[weight]), dtype=np.float64)
    axis = t.axes[0]
    out = np.zeros(block.num_heads)
    for h in range(block.num_heads):
        idx = np.flatnonzero([u >= 0 and h in heads_of_unit[u] for u in t.owner])
        out[h] = np.linalg.norm(np.take(value, idx, axis=axis)) if len(idx) else 0.0
    return out


def weight_importance(block: AttentionBlock, graph: gs.Graph) -> np.ndarray:
    tensors = graph.tensors()
    units = block.units
    score = _norms(block, tensors, block.o_proj.weight, units)
    v = block.projection("v")
    if v is not None:
        score = score * _norms(block, tensors, v.weight, units)
    return score


def load_heads_to_prune(path: str | Path) -> dict[int, list[int]]:
    """``{"<block index>": [head, ...]}`` (heads to remove), blocks counted as ``inspect`` lists them.
    Block and head ranges are checked against the matched blocks by ``check_heads_to_prune``."""
    data = _read_json(Path(path), "a heads file")
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


# ---------------------------------------------------------------------------- importance as an artefact
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


def _read_json(path: Path, what: str):
    """A JSON file as Python, with one-line errors; a key given twice in one object is refused."""
    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                raise InputError(f"{path}: key {k!r} appears twice")
            seen[k] = v
        return seen

    try:
        return json.loads(path.read_text(), object_pairs_hook=pairs)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not {what}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({str(exc)[:120]})") from None


def load_importance_file(path: str | Path, blocks) -> dict[int, np.ndarray]:
    """Scores from a file: JSON ``{"<block index or name>": [score per head]}``, or NPY [num_blocks, H].
    A block named twice (by index and by name) is refused, unless both give the same scores."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an importance file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            from .calibrate import npz_reason
            raise InputError(f"{path}: not a .npy array ({npz_reason(exc)})") from None
        if arr.ndim != 2 or arr.shape[0] != len(blocks):
            raise InputError(f"{path}: shape {list(arr.shape)}; expected [{len(blocks)} blocks, heads]")
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{path}: holds {arr.dtype} values, not numbers")
        data = {str(i): row for i, row in enumerate(arr)}
    else:
        data = _read_json(path, "an importance file")
        if not isinstance(data, dict):
            raise InputError(f'{path}: expected an object {{"<block index or name>": [score, ...]}}')
    by_name = {b.name: b for b in blocks}
    out, named = {}, {}
    for key, scores in data.items():
        b = by_name.get(key)
        if b is None:
            try:
                i = int(key)
                if i < 0:
                    raise IndexError
                b = blocks[i]
            except (ValueError, IndexError):
                raise InputError(f"{path}: no block {key!r} (the model has {len(blocks)} blocks)") from None
        if isinstance(scores, (str, bytes)) or (isinstance(scores, list)
                                                and any(isinstance(v, (str, bool, list, dict)) for v in scores)):
            raise InputError(f"{path}: block {key}: scores must be a list of numbers")
        try:
            arr = np.asarray(scores, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InputError(f"{path}: block {key}: scores must be a list of numbers") from None
        if arr.size != b.num_heads or not np.all(np.isfinite(arr)):
            raise InputError(f"{path}: block {key}: expected {b.num_heads} finite scores")
        if b.index in out and not np.array_equal(out[b.index], arr):
            raise InputError(f"{path}: block {b.index} is named twice ({named[b.index]!r} and {key!r}) with "
                             "different scores")
        out[b.index], named[b.index] = arr, key
    return out
