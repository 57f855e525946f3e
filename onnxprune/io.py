"""Load and save models: clear errors for bad files, atomic writes, external data kept as it was."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import InputError

TWO_GB = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated or corrupt'})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated or not ONNX?)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        # ops that onnx does not know (ONNX Runtime's contrib ops in the default domain, as the GenAI
        # builder writes them) are for ONNX Runtime to judge: the probe runs the model on it
        if not str(exc).startswith("No Op registered for"):
            raise InputError(f"{path}: invalid ONNX model: {str(exc).splitlines()[0][:160]}") from None
    return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph, every node with a unique name (unnamed ones get ``<op>_<index>``)."""
    graph = gs.import_onnx(model)
    seen = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}" if node.name not in seen else f"{node.name}_{i}"
        seen.add(node.name)
    return graph


def check_output_path(src: Path, out: Path, force: bool):
    if out.resolve() == src.resolve() and not force:
        raise InputError(f"{out}: output would overwrite the input (use --force to allow)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output directory does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: output directory is not writable")


def publish(tmp: str | Path, out: Path):
    """Rename ``tmp`` onto ``out`` with the permissions a plain open() would give (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the model at ``path`` keeps its weights in an external data file."""
    from onnx.external_data_helper import uses_external_data as external
    model = onnx.load(str(path), load_external_data=False)
    return any(external(t) for t in model.graph.initializer)


def save_model_atomic(model: onnx.ModelProto, out: Path, external: bool = False):
    """Write ``out`` (and ``out.name + ".data"`` when ``external`` or above 2 GB) through temporary files
    beside it, renamed into place: never half a model, and a fresh data file, never appended to an old one
    (onnx.save appends to an existing data file)."""
    out = Path(out)
    external = external or model.ByteSize() > TWO_GB
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmpdir / out.name
        if external:
            data = out.name + ".data"
            onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                      size_threshold=1024)
            publish(tmpdir / data, out.parent / data)
        else:
            onnx.save(model, str(tmp))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
