"""A large model that keeps its weights inside its .onnx file, read and written without holding them.

``onnx.load`` reads the whole file and then parses it: two copies of every weight at once, and the graph
IR, the probe and the export add more. For a model of a gigabyte that is several gigabytes of memory. Here
the file is scanned in protobuf's wire format instead (``skeleton``): every tensor of ``LARGE`` bytes or
more stays where it is, and the model read is a skeleton whose large tensors are declared as external
data that lives in the model file itself (location: the file's own name, offset and length of its bytes).
The pipeline then treats it like any model with external data: weights stay on disk, and only those of
the attention blocks are read.

``write_inline`` writes such a model back as one self-contained .onnx file, streaming each large tensor
from its source in chunks. It relies on a rule of protobuf's wire format: messages written one after
another parse as their merge, so the skeleton is written first, and then each large tensor as a message of
its own that holds only ``graph.initializer[i]``; a reader (onnx, ONNX Runtime) sees one model. The form
of the input, weights inside the file, is kept.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .external import copy_bytes
from .proto import copy_without_initializers

LARGE = 1 << 20                 # tensors of this many bytes or more stay in the file
SKELETON_FROM = 256 << 20       # files from this size on are read as a skeleton (``load.load_model``)
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field, start of its value, end of the field) of a message."""
    pos = start
    while pos < end:
        tag, value = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, stop = _varint(buf, value)
        elif wire == 1:
            stop = value + 8
        elif wire == 5:
            stop = value + 4
        elif wire == 2:
            length, value = _varint(buf, value)
            stop = value + length
        else:
            raise ValueError(f"wire type {wire}")
        if stop > end:
            raise ValueError("truncated")
        yield number, wire, pos, value, stop
        pos = stop


def skeleton(path: str | os.PathLike, large: int | None = None) -> onnx.ModelProto | None:
    """The model at ``path`` with each tensor's raw bytes of ``large`` bytes or more left in the file
    (declared as external data at their offset in it); None when it has none, or a layout this reader does
    not take (then load it whole)."""
    path = Path(path)
    large = LARGE if large is None else large
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            top = list(_fields(buf, 0, len(buf)))
            # the graph may come in several pieces, which parse as their merge (``write_inline`` writes so)
            graphs = [(v, e) for n, wire, _, v, e in top if n == _MODEL_GRAPH and wire == 2]
            if not graphs:
                return None
            model = onnx.ModelProto()
            model.ParseFromString(b"".join(buf[s:e] for n, _, s, _, e in top if n != _MODEL_GRAPH))
            graph, tensors, moved = onnx.GraphProto(), [], 0
            rest = []
            for number, wire, s, v, e in (f for gstart, gend in graphs for f in _fields(buf, gstart, gend)):
                if number != _GRAPH_INITIALIZER or wire != 2:
                    rest.append(buf[s:e])
                    continue
                raw = [fl for fl in _fields(buf, v, e) if fl[0] == _TENSOR_RAW_DATA and fl[1] == 2]
                t = onnx.TensorProto()
                if len(raw) == 1 and raw[0][4] - raw[0][3] >= large:
                    _, _, rs, rv, re_ = raw[0]
                    t.ParseFromString(buf[v:rs] + buf[re_:e])
                    t.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", path.name), ("offset", str(rv)), ("length", str(re_ - rv))):
                        entry = t.external_data.add()
                        entry.key, entry.value = key, value
                    moved += 1
                else:
                    t.ParseFromString(buf[v:e])
                tensors.append(t)
            if not moved:
                return None
            graph.ParseFromString(b"".join(rest))
        except (ValueError, IndexError, DecodeError):
            return None
    graph.initializer.extend(tensors)
    model.graph.CopyFrom(graph)
    return model


def self_contained(model: onnx.ModelProto, model_path: str | os.PathLike) -> bool:
    """Every external tensor of ``model`` lives in the file ``model_path`` itself (a ``skeleton``)."""
    from onnx.external_data_helper import uses_external_data
    name = Path(model_path).name
    ext = [t for t in model.graph.initializer if uses_external_data(t)]
    return bool(ext) and all(_location(t) == name for t in ext)


def _location(t) -> str | None:
    return next((e.value for e in t.external_data if e.key == "location"), None)


def _info(t) -> tuple[str, int, int]:
    d = {e.key: e.value for e in t.external_data}
    return d["location"], int(d.get("offset", 0)), int(d["length"])


def _tag(number: int, wire: int) -> bytes:
    return _encode(number << 3 | wire)


def _encode(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def write_inline(model: onnx.ModelProto, path: str | os.PathLike, src_dir: str | os.PathLike):
    """Write ``model`` to ``path`` as one file, every external tensor's bytes copied in from its file under
    ``src_dir`` in chunks (see the module docstring)."""
    from onnx.external_data_helper import uses_external_data
    body = copy_without_initializers(model)
    body.graph.node.extend(model.graph.node)
    external = []
    for t in model.graph.initializer:
        if uses_external_data(t):
            external.append(t)
        else:
            body.graph.initializer.append(t)
    with open(path, "wb") as out:
        out.write(body.SerializeToString())
        del body
        for t in external:
            location, offset, length = _info(t)
            header = onnx.TensorProto()
            header.CopyFrom(t)
            header.ClearField("external_data")
            header.ClearField("data_location")
            head = header.SerializeToString() + _tag(_TENSOR_RAW_DATA, 2) + _encode(length)
            tensor_size = len(head) + length
            graph_part = _tag(_GRAPH_INITIALIZER, 2) + _encode(tensor_size)
            out.write(_tag(_MODEL_GRAPH, 2) + _encode(len(graph_part) + tensor_size) + graph_part + head)
            copy_bytes(Path(src_dir) / location, offset, length, out, t.name)
