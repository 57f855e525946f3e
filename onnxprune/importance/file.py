"""A file of scores: JSON ``{"<block index or name>": [score per head]}`` (or what ``onnxprune score --json``
writes: the same under ``"blocks"``, beside its ``"method"``) or a ``[blocks, H]`` .npy array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import read_json
from .source import Source


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
            from ..calibration.data import npz_reason
            raise InputError(f"{path}: not a .npy array ({npz_reason(exc)})") from None
        if arr.ndim != 2 or arr.shape[0] != len(blocks):
            raise InputError(f"{path}: shape {list(arr.shape)}; expected [{len(blocks)} blocks, heads]")
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{path}: holds {arr.dtype} values, not numbers")
        data = {str(i): row for i, row in enumerate(arr)}
    else:
        data = read_json(path, "an importance file")
        if not isinstance(data, dict):
            raise InputError(f'{path}: expected an object {{"<block index or name>": [score, ...]}}')
        if set(data) == {"method", "blocks"} and isinstance(data["blocks"], dict):     # onnxprune score --json
            data = data["blocks"]
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


def _score(ctx):
    return load_importance_file(ctx.options.importance, ctx.blocks)


SOURCE = Source("file", 'FILE.json|npy: {"<block index or name>": [score per head]} or a [blocks, heads] '
                "array", _score, order=90)
