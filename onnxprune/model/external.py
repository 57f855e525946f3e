"""External data: tensors whose bytes live in another file, read on demand and copied in chunks (a weight
is never held whole when it need not be)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..errors import InputError
from ..progress import Progress
from .dtypes import PACKED_TYPES


def read_external(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    from onnx.external_data_helper import ExternalDataInfo
    if tensor.data_type in PACKED_TYPES:       # two values a byte: onnx unpacks them
        return onnx.numpy_helper.to_array(tensor, base_dir=str(base_dir))
    info = ExternalDataInfo(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    arr = np.fromfile(Path(base_dir) / info.location, dtype=dtype, count=count, offset=info.offset)
    return arr.reshape(tuple(tensor.dims))


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` (loaded with ``external_data=False``) keeps weights in an external data file."""
    from onnx.external_data_helper import uses_external_data as external
    return any(external(t) for t in model.graph.initializer)


def data_files(path: str | os.PathLike, model: onnx.ModelProto) -> list[Path]:
    """The external data files that ``model`` (loaded from ``path`` without them) reads, resolved."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as external
    folder = Path(path).parent
    found = []
    for t in model.graph.initializer:
        if external(t):
            f = (folder / ExternalDataInfo(t).location).resolve()
            if f not in found and f != Path(path).resolve():     # a skeleton's data is its own file
                found.append(f)
    return found


def input_files(path: str | os.PathLike, model: onnx.ModelProto) -> list[Path]:
    """Every file the input model consists of: the model file and its external data files."""
    return [Path(path).resolve()] + data_files(path, model)


TWO_GB = 2**31 - 1


def fits_inline(model: onnx.ModelProto, src_dir: Path) -> bool:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as is_external
    total = model.ByteSize() + sum(int(ExternalDataInfo(t).length or 0) for t in model.graph.initializer
                                   if is_external(t))
    return total < TWO_GB


_CHUNK = 64 << 20


_ALIGN = 64 << 10          # large tensors start on a 64 KiB boundary, as onnx aligns them (mmap-friendly)


def copy_bytes(src: Path, offset: int, length: int, out, tensor: str, progress=None):
    """``length`` bytes of file ``src`` from ``offset`` written to ``out``, in chunks (a weight is never held
    whole)."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise InputError(f"{src}: shorter than tensor {tensor!r} needs")
            out.write(chunk)
            left -= len(chunk)
            if progress is not None:
                progress.advance(len(chunk))


def stream_external(model: onnx.ModelProto, path: Path, location: str, src_dir: Path):
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as is_external
    tensors = list(model.graph.initializer)
    total = sum(ExternalDataInfo(t).length if is_external(t) else len(t.raw_data) for t in tensors)
    progress = Progress(total, f"writing {path.name}")
    with open(path, "wb") as f:
        for t in tensors:
            if is_external(t):
                info = ExternalDataInfo(t)
                length = info.length if info.length else (src_dir / info.location).stat().st_size - info.offset
                offset = _pad(f, length)
                copy_bytes(src_dir / info.location, info.offset, length, f, t.name, progress)
            elif t.HasField("raw_data") and len(t.raw_data) >= 1024:
                length = len(t.raw_data)
                offset = _pad(f, length)
                f.write(t.raw_data)
                t.ClearField("raw_data")
                progress.advance(length)
            else:
                continue
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
    progress.done()


def _pad(f, length: int) -> int:
    pos = f.tell()
    if length >= (1 << 20) and pos % _ALIGN:
        f.write(b"\0" * (_ALIGN - pos % _ALIGN))
    return f.tell()
