"""Load a model: clear one-line errors for bad files, the checker run without reading weights, external
data left on disk."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import InputError, ModelTypeError
from . import inline
from .external import has_external_data
from .proto import copy_without_initializers, sort_nodes


def load_model(path: str | os.PathLike, external_data: bool = True) -> onnx.ModelProto:
    """Load and check ``path``. With ``external_data=False`` the weights stay in their data files (see
    ``prune_model(external_dir=...)``); the check then works on the path, where it finds them."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    if not external_data and path.stat().st_size >= inline.SKELETON_FROM:
        # a large file: its big tensors stay in it, read on demand like external data (see ``inline``)
        model = inline.skeleton(path)
        if model is not None:
            return _checked(model, path)
    try:
        model = onnx.load(str(path), load_external_data=external_data)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated or corrupt'})") from None
    return _checked(model, path)


def _checked(model: onnx.ModelProto, path) -> onnx.ModelProto:
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated or not ONNX?)")
    try:   # in memory when the file holds everything: no second read of it
        try:
            if inline.self_contained(model, path):      # a skeleton: its structure, without reading weights
                onnx.checker.check_model(_weightless_copy(model))
            else:
                onnx.checker.check_model(str(path) if has_external_data(model) else model)
        except onnx.checker.ValidationError as exc:
            # ORT's float16 converter (keep_io_types) can leave nodes out of order; ORT runs them: sort them
            if "topologically sorted" not in str(exc) or not sort_nodes(model):
                raise
            onnx.checker.check_model(model if not has_external_data(model) else _weightless_copy(model))
    except onnx.checker.ValidationError as exc:
        # ops that onnx does not know (ONNX Runtime's contrib ops in the default domain, as the GenAI
        # builder writes them) are for ONNX Runtime to judge: the probe runs the model on it
        if not str(exc).startswith("No Op registered for"):
            raise InputError(f"{path}: invalid ONNX model: {str(exc).splitlines()[0][:160]}") from None
    return model


def _weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's structure for the checker, its external weights as graph inputs (never read)."""
    light = copy_without_initializers(model)
    light.graph.node.extend(model.graph.node)
    for t in model.graph.initializer:
        light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def as_model(model, external_dir: str | os.PathLike | None = None
             ) -> tuple[onnx.ModelProto, str | os.PathLike | None]:
    """What the API takes as a model: an ``onnx.ModelProto`` (used as it is), a path (loaded and checked as
    the command line does; a model with external data keeps it on disk, read from the path's folder), or
    the bytes of a model. Returns (model, external_dir). Anything else raises ``ModelTypeError``."""
    if isinstance(model, onnx.ModelProto):
        return model, external_dir
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, external_data=False)
        if external_dir is None and has_external_data(loaded):
            external_dir = Path(model).resolve().parent
        return loaded, external_dir
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            loaded = onnx.load_model_from_string(bytes(model))
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise InputError(f"the bytes given are not an ONNX model ({type(exc).__name__})") from None
        if has_external_data(loaded) and external_dir is None:
            raise InputError("the bytes given are a model with external data; pass its path instead")
        return _checked(loaded, "the bytes given"), external_dir
    raise ModelTypeError(f"model must be an onnx.ModelProto, a path to an .onnx file or the bytes of one, "
                         f"not {type(model).__name__}")
