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
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
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
        out[b] = sorted(set(heads))
    return out


def check_heads_to_prune(heads_to_prune: dict[int, list[int]], blocks):
    for b, heads in heads_to_prune.items():
        if not 0 <= b < len(blocks):
            raise InputError(f"heads to prune: block {b} does not exist (the model has {len(blocks)} blocks)")
        bad = [h for h in heads if not 0 <= h < blocks[b].num_heads]
        if bad:
            raise InputError(f"heads to prune: block {b} has {blocks[b].num_heads} heads; no head {bad[0]}")
