"""Calibration data: ``DATA.npz`` read and checked against the graph inputs, and cut into batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import InputError
from ..inputs import checked_array, input_shapes

BATCH = 16
HELD_OUT = 4      # every 4th calibration batch judges a fit made on the others (compensation, cuts inside heads)


def held_out_batches(batches: int) -> set[int]:
    """The batches that judge a fit: every ``HELD_OUT``-th; none with fewer than 2 (the fit judges itself)."""
    return set(range(HELD_OUT - 1, batches, HELD_OUT)) if batches >= 2 else set()


def npz_reason(exc: Exception) -> str:
    """numpy's reason for not reading a file, without its advice to load pickles (never done here)."""
    if "pickled" in str(exc):
        return "it holds pickled Python objects, which are never loaded; save plain arrays"
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def load_calib(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``DATA.npz``: one array per graph input, named after it, samples along axis 0."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not an .npz file ({npz_reason(exc)})") from None
    inputs = {i.name: i for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    needed = [n for n in inputs if n not in inits]
    counts, given = {len(a) if a.ndim else 0 for a in data.values()}, list(data)
    missing = [n for n in needed if n not in data]
    if missing and len(counts) == 1 and 0 not in counts:       # a KV cache's past, empty, need not be given
        shapes = input_shapes(model, next(iter(counts)), 1, past=0)
        for n in [n for n in missing if "past" in n.lower() and 0 in shapes[n][1:]]:
            dtype = helper.tensor_dtype_to_np_dtype(inputs[n].type.tensor_type.elem_type)
            data[n] = np.zeros(shapes[n], dtype=dtype)
            missing.remove(n)
    extra = [k for k in data if k not in inputs]
    if missing or extra:          # everything that does not fit, at once
        said = ([f"no array for graph input(s) {', '.join(map(repr, missing))}"] if missing else []) + \
               ([f"array(s) {', '.join(map(repr, extra))} not graph inputs"] if extra else [])
        raise InputError(f"{path}: {'; '.join(said)} (it has {', '.join(given) or 'none'}; the graph takes "
                         f"{', '.join(needed)}; onnxprune calib makes the data from text)")
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{path}: arrays must share their first axis (samples); got lengths {sorted(counts)}")
    out = {}
    for name in needed:
        arr = data[name]
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise InputError(f"{path}: array {name!r} holds {arr[tuple(bad)]} at {list(map(int, bad))}; "
                             "calibration data must be finite")
        dtype = helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.integer) and arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
            raise InputError(f"{path}: array {name!r} holds fractions; graph input {name!r} takes integers")
        out[name] = checked_array(arr, inputs[name], str(path), fixed_from=1)   # samples on axis 0
    return out


def batches(data: dict[str, np.ndarray], size: int = BATCH) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]
