"""Load and save models: clear errors for bad files, atomic writes, external data kept as it was."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from . import inline
from .errors import InputError, ModelTypeError, OutputError

TWO_GB = 2**31 - 1


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


def sort_nodes(model: onnx.ModelProto) -> bool:
    """Put the main graph's nodes in topological order (in memory); False when they have a cycle or read
    a tensor that nothing makes."""
    graph = model.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            return False
        for n in ready:
            known.update(n.output)
        ready_ids = {id(n) for n in ready}
        ordered += ready
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [onnx.NodeProto() for _ in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


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


def read_json(path: Path, what: str):
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


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of the main graph that read it, in graph order."""
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def large_weights(model: onnx.ModelProto, threshold: int) -> set[str]:
    """Floating-point initializers of ``threshold`` bytes or more, in memory or in an external file, that
    are not also graph inputs: the weights whose values neither probing nor checking needs."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as external
    inputs = {i.name for i in model.graph.input}
    return {init.name for init in model.graph.initializer
            if init.data_type in FLOAT_TYPES and init.name not in inputs
            and (ExternalDataInfo(init).length if external(init) else len(init.raw_data)) >= threshold}


def find_constant(model: onnx.ModelProto, name: str) -> tuple[onnx.TensorProto, onnx.NodeProto | None] | None:
    """The tensor behind ``name`` in ``model``: (an initializer, None), (a Constant node's value, the node),
    or, through Identity (TorchScript shares equal weights so), its source's. None when ``name`` is not a
    constant. Reads only: the model is never changed. (The graphsurgeon side has ``headflow.const_value``.)"""
    for init in model.graph.initializer:
        if init.name == name:
            return init, None
    for node in model.graph.node:
        if node.output and node.output[0] == name:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                return node.attribute[0].t, node
            if node.op_type == "Identity":
                return find_constant(model, node.input[0])
            return None
    return None


def constant_array(model: onnx.ModelProto, name: str, external_dir: str | os.PathLike | None = None
                   ) -> np.ndarray | None:
    """The value of constant ``name`` (see ``find_constant``), read from its external data file when it
    has one (``external_dir``: that file's folder); None when ``name`` is not a constant."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data
    found = find_constant(model, name)
    if found is None:
        return None
    proto = found[0]
    if uses_external_data(proto):
        return read_external(proto, str(external_dir or "."))
    return numpy_helper.to_array(proto)


def own_constant(model: onnx.ModelProto, name: str, initializer: bool = False) -> onnx.TensorProto:
    """The tensor of constant ``name``, to be edited in place: an initializer, or a Constant node's value
    (made an initializer with ``initializer``). A weight shared through Identity gets a copy of its own
    first, so that editing it leaves the other users alone. Changes ``model``: call it on a copy."""
    found = find_constant(model, name)
    if found is None:
        raise KeyError(name)
    proto, node = found
    via_identity = (proto.name if node is None else node.output[0]) != name
    if via_identity:          # ``name`` is an Identity's output: the Identity goes, a copy takes its place
        node = next(n for n in model.graph.node if n.op_type == "Identity" and n.output[0] == name)
    elif node is None or not initializer:
        return proto
    model.graph.node.remove(node)
    own = model.graph.initializer.add()
    own.CopyFrom(proto)
    own.name = name
    return own


def own_weights(model: onnx.ModelProto, names) -> None:
    """Each of ``names`` that is the Identity of another (a weight TorchScript shared) gets a copy of its
    own, so that editing one leaves the others alone; a shared source itself keeps its tensor."""
    names = set(names)
    sources = {n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.output[0] in names}
    for name in names - sources:
        if find_constant(model, name) is not None:
            own_constant(model, name)


def copy_without_initializers(model: onnx.ModelProto, value_info: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with every field but the graph's initializers (and nodes), which the caller
    fills: copying a model's weights is what the large-model path must never do."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.metadata_props.extend(model.metadata_props)
    g, src = light.graph, model.graph
    g.name, g.doc_string = src.name, src.doc_string
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.sparse_initializer.extend(src.sparse_initializer)
    if value_info:
        g.value_info.extend(src.value_info)
    return light


def attach_external(graph: gs.Graph, base_dir: str | os.PathLike):
    """Let the graph's constants whose data sits in external files be read from ``base_dir``, on demand and
    without being kept (``headflow.const_value``): only the attention weights are ever read, one at a time,
    and the others are written out by streaming their bytes (``save_model_atomic``)."""
    from onnx.external_data_helper import uses_external_data as external
    for t in graph.tensors().values():
        lazy = getattr(t, "_values", None)
        if isinstance(t, gs.Constant) and hasattr(lazy, "tensor") and external(lazy.tensor):
            lazy.base_dir = str(base_dir)


def read_external(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    from onnx.external_data_helper import ExternalDataInfo
    from .probe import PACKED_TYPES
    if tensor.data_type in PACKED_TYPES:       # two values a byte: onnx unpacks them
        return onnx.numpy_helper.to_array(tensor, base_dir=str(base_dir))
    info = ExternalDataInfo(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    arr = np.fromfile(Path(base_dir) / info.location, dtype=dtype, count=count, offset=info.offset)
    return arr.reshape(tuple(tensor.dims))


def _unique_names(nodes, op_of) -> list[str] | None:
    """Every node's name, unnamed ones as ``<op>_<index>`` and repeated ones as ``<name>_<index>``; None
    when every node already has a name of its own."""
    seen, names, changed = set(), [], False
    for i, node in enumerate(nodes):
        name = node.name
        if not name or name in seen:
            name = f"{op_of(node)}_{i}" if name not in seen else f"{name}_{i}"
            changed = True
        seen.add(name)
        names.append(name)
    return names if changed else None


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node of its main graph named uniquely: the model itself when all are, else a
    named copy (the caller's model is never changed). Named once, before anything reads the model, every
    module can then find a node by its name, in the ModelProto and in the graphsurgeon graph alike."""
    names = _unique_names(model.graph.node, lambda n: n.op_type)
    if names is None:
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node, name in zip(named.graph.node, names):
        node.name = name
    return named


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph, every node with a unique name (as ``name_nodes`` gives them)."""
    graph = gs.import_onnx(model)
    names = _unique_names(graph.nodes, lambda n: n.op)
    for node, name in zip(graph.nodes, names or ()):
        node.name = name
    return graph


def check_output_path(src: Path, out: Path, force: bool):
    """``out`` can be written: its folder exists and is writable, it is no folder itself, and it is not the
    input model (unless ``force``). Collisions with the input's data files and between the outputs of one
    run are ``check_writes``'s."""
    out = Path(out)
    if out.resolve() == Path(src).resolve() and not force:
        raise InputError(f"{out}: output would overwrite the input (use --force to allow)")
    if not str(out).strip():
        raise InputError("the output path is empty")
    if out.is_dir():
        raise InputError(f"{out}: is a directory; name a file to write")
    if out.exists() and not out.is_file():       # /dev/null, a FIFO: a rename would replace the device itself
        raise InputError(f"{out}: not a regular file; name a file to write")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output directory does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: output directory is not writable")


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


def check_writes(inputs: list[Path], writes: dict[str, Path | None], may_replace: Path | None = None):
    """Refuse, before any work, a run that would write over a file of its input (a model or its external
    data) or write two of its outputs to one path. ``writes``: {what (for the message): path}.
    ``may_replace``: the one input file that an output may replace (the model, with ``--force``)."""
    inputs = [Path(p).resolve() for p in inputs]
    allowed = Path(may_replace).resolve() if may_replace is not None else None
    seen: dict[Path, str] = {}
    for what, path in writes.items():
        if path is None:
            continue
        real = Path(path).resolve()
        if real in inputs and real != allowed:
            raise InputError(f"{path}: the {what} would overwrite {real.name}, a file of the input; "
                             "name another file")
        if real in seen:
            raise InputError(f"{path}: named both as the {seen[real]} and as the {what}; name two files")
        seen[real] = what


def publish(tmp: str | Path, out: Path, reserved: bool = False):
    """Rename ``tmp`` onto ``out`` with the permissions a plain open() would give (mkstemp makes 0600).

    ``reserved``: ``out`` is our own empty placeholder (``_data_name``). It is then replaced by a hard link
    rather than renamed over: ext4 writes a file's data out before it is renamed over another (0.5 s for
    2 GB here), and a link fails rather than clobbers if another run took the name in between."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if reserved:
        os.unlink(out)
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise OutputError(f"{out}: another run took this data file name while this one was writing; "
                              "run again") from None
        except OSError:               # no hard links on this filesystem
            os.replace(tmp, out)
        else:
            os.unlink(tmp)
        return
    os.replace(tmp, out)


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` (loaded with ``external_data=False``) keeps weights in an external data file."""
    from onnx.external_data_helper import uses_external_data as external
    return any(external(t) for t in model.graph.initializer)


def write_error(path, exc: OSError) -> OutputError:
    """An OSError met while writing ``path``, as one line (a full disk, a read-only or vanished folder)."""
    return OutputError(f"{path}: could not write ({exc.strerror or exc}); nothing written")


class Staged:
    """Files written into a temporary folder beside their destination, not yet in place: ``publish()``
    moves them there, ``discard()`` removes them. Use as a context manager: leaving the block without
    publishing discards.

    A model with external data is two files, and no rename makes two files change at once. The data file
    therefore gets a name that no file in the destination folder has (``model.onnx.data``, else
    ``model.onnx.1.data``, ...), reserved at once by an empty file so that a concurrent run takes another:
    it is moved in first, where no model reads it, and the model that reads it is renamed last, in one
    step. A reader sees the old model with its old data, or the new with the new. Then the data files of
    the replaced model that are ours by name, and not in ``keep`` (the input's), are removed."""

    def __init__(self, tmpdir: Path, out: Path, data: str | None, keep: frozenset = frozenset()):
        self.dir, self.out, self.data, self.keep = tmpdir, out, data, keep
        self.path = tmpdir / out.name
        self.reserved = out.parent / data if data else None     # the empty placeholder, until published

    def publish(self):
        moved = False
        final = self.out.parent / self.data if self.data else None
        try:
            stale = _stale_data(self.out, self.keep | ({final.resolve()} if final else set()))
            if final is not None:
                publish(self.dir / self.data, final, reserved=True)
                moved = True
            publish(self.path, self.out)
        except BaseException as exc:      # unless the model was renamed, none reads the new data: take it back
            if moved and self.path.exists():
                final.unlink(missing_ok=True)
            if moved:
                self.reserved = None
            self.discard()
            if isinstance(exc, OSError):
                raise write_error(self.out, exc) from None
            raise
        self.reserved = None
        for old in stale:
            old.unlink(missing_ok=True)
        self.discard()

    def discard(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.reserved is not None:
            self.reserved.unlink(missing_ok=True)
            self.reserved = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


class StagedFile:
    """One file (a JSON report, a config, a copy of a tokenizer file) written beside its destination, renamed
    into place by ``publish()``. ``content``: the bytes, or a file to copy."""

    def __init__(self, out: Path, content: bytes | Path):
        out = Path(out)
        self.out = out
        with _undone_on_failure(lambda: None, out):
            fd, self.tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        with _undone_on_failure(self.discard, out), os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray)):
                f.write(content)
            else:
                with open(content, "rb") as src:
                    shutil.copyfileobj(src, f)

    def publish(self):
        try:
            publish(self.tmp, self.out)
        except OSError as exc:
            self.discard()
            raise write_error(self.out, exc) from None

    def discard(self):
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _data_name(out: Path, avoid: set[Path]) -> str:
    """A data file name for ``out`` that names no existing file and none of ``avoid``, reserved by creating
    it empty (exclusively: two runs never get the same name)."""
    for n in range(1000):
        name = f"{out.name}.data" if n == 0 else f"{out.name}.{n}.data"
        path = out.parent / name
        if path.resolve() in avoid:
            continue
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise write_error(path, exc) from None
        return name
    raise OutputError(f"{out.parent}: too many {out.name}.N.data files; remove the old ones")


def ours(out: Path, name: str) -> bool:
    """Whether ``name`` is one of the data file names that ``stage_model`` gives ``out``."""
    rest = name[len(out.name):] if name.startswith(out.name + ".") else ""
    return rest == ".data" or (rest.endswith(".data") and rest[1:-5].isdigit())


def _stale_data(out: Path, keep: set[Path]) -> tuple[Path, ...]:
    """The data files that the model now at ``out`` reads, are named as ours (``out.name`` + ``.data`` or
    ``.N.data``) and are not in ``keep``: what replacing that model leaves unread. A large or unreadable
    model at ``out`` (no external data then, or not ours) gives none."""
    if not out.is_file() or out.stat().st_size > (64 << 20):
        return ()
    try:
        old = onnx.load(str(out), load_external_data=False)
    except Exception:            # not a model we can read: leave everything beside it alone
        return ()
    return tuple(f for f in data_files(out, old)
                 if f.parent == out.parent.resolve() and ours(out, f.name) and f not in keep and f.is_file())


def _fits_inline(model: onnx.ModelProto, src_dir: Path) -> bool:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as is_external
    total = model.ByteSize() + sum(int(ExternalDataInfo(t).length or 0) for t in model.graph.initializer
                                   if is_external(t))
    return total < TWO_GB


def stage_model(model: onnx.ModelProto, out: Path, external: bool = False,
                external_dir: str | os.PathLike | None = None, avoid=(), keep=(),
                inline_from: str | os.PathLike | None = None) -> Staged:
    """Write ``out`` (and a data file when ``external`` or above 2 GB, see ``Staged``) into a temporary
    folder beside it. The data file is always fresh (onnx.save would append to an existing one).

    Tensors that still refer to the input's data file (a model loaded without its external data, from
    ``external_dir``) are copied from there in chunks, so that no weight is ever held twice in memory.
    ``model`` is changed on the way: its tensors then point at the new file (pass a copy to keep it).
    ``avoid``: paths the data file must not take (the run's other outputs). ``keep``: files that must
    outlive the replaced model at ``out`` (the input's own files), unless ``out`` is one of them: a model
    pruned in place (``--force``) replaces its input, and the input's data file goes with it.
    ``inline_from``: the input model file when it held its weights itself (read as an ``inline.skeleton``):
    the output holds them too, streamed in (unless it would pass 2 GB).
    """
    from onnx.external_data_helper import uses_external_data as is_external
    out = Path(out)
    lazy = external_dir is not None and any(is_external(t) for t in model.graph.initializer)
    # a model read as a skeleton of its own file (``inline``) is written back whole, as it came
    whole = lazy and inline_from is not None and _fits_inline(model, Path(external_dir))
    external = (external or lazy or model.ByteSize() > TWO_GB) and not whole
    keep = frozenset(Path(p).resolve() for p in keep)
    if out.resolve() in keep:
        keep = frozenset()
    data = _data_name(out, {Path(p).resolve() for p in avoid} | keep) if external else None
    with _undone_on_failure(lambda: data and (out.parent / data).unlink(missing_ok=True), out):
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    staged = Staged(tmpdir, out, data, keep)
    with _undone_on_failure(staged.discard, out):
        if whole:
            inline.write_inline(model, staged.path, external_dir)
        elif lazy:
            _stream_external(model, tmpdir / staged.data, staged.data, Path(external_dir))
            onnx.save(model, str(staged.path))
        elif external:
            onnx.save(model, str(staged.path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=staged.data, size_threshold=1024)
        else:
            onnx.save(model, str(staged.path))
    return staged


@contextlib.contextmanager
def _undone_on_failure(undo, path):
    """Run ``undo`` when the block fails in any way (a signal too), and report an OSError as one line."""
    try:
        yield
    except OSError as exc:
        undo()
        raise write_error(path, exc) from None
    except BaseException:
        undo()
        raise


def save_model_atomic(model: onnx.ModelProto, out: Path, external: bool = False,
                      external_dir: str | os.PathLike | None = None):
    """``stage_model`` and publish: never half a model in place, and a fresh data file."""
    stage_model(model, out, external, external_dir).publish()


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


def _stream_external(model: onnx.ModelProto, path: Path, location: str, src_dir: Path):
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


class Progress:
    """A one-line progress bar on stderr, shown only on a terminal and only for long work. ``total`` counts
    bytes (shown in GB) or, with ``unit``, steps of that name."""

    def __init__(self, total: int, label: str, min_total: int = 256 << 20, unit: str | None = None):
        import sys
        self.total, self.label, self.done_bytes, self.unit = total, label, 0, unit
        self.stream = sys.stderr
        self.on = total >= min_total and self.stream.isatty()
        self.last = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.done()

    def update(self, n: int = 1):
        self.advance(n)

    def advance(self, n: int):
        self.done_bytes += n
        if not self.on:
            return
        pct = int(100 * self.done_bytes / max(self.total, 1))
        if pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            size = f"{self.done_bytes}/{self.total} {self.unit}" if self.unit else f"of {self.total / 2**30:.2f} GB"
            self.stream.write(f"\r{self.label} [{bar:<25}] {pct:3d}% {size}")
            self.stream.flush()

    def done(self):
        if self.on:
            self.stream.write("\n")
            self.stream.flush()
