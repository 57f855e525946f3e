"""Write a model atomically: never half a model in place, a fresh data file for external data, the input's
files never overwritten."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
import os

import onnx

from ..errors import OutputError
from .. import files
from . import inline
from .external import TWO_GB, data_files, fits_inline, stream_external


class Staged:
    """Files written into a temporary folder beside their destination, not yet in place: ``publish()``
    moves them there, ``discard()`` removes them. Use as a context manager: leaving the block without
    publishing discards.

    A model with external data is two files, and no rename makes two files change at once. The data file
    therefore gets a name that no file in the destination folder has (``model.onnx.data``, else
    ``model.onnx.1.data``, ...), reserved at once by a hidden marker (``_data_name``) so that a concurrent run
    takes another: it is moved in first, where no model reads it, and the model that reads it is renamed last,
    in one step. A reader sees the old model with its old data, or the new with the new. Then the data files of
    the replaced model that are ours by name, and not in ``keep`` (the input's), are removed."""

    def __init__(self, tmpdir: Path, out: Path, data: str | None, keep: frozenset = frozenset()):
        self.dir, self.out, self.data, self.keep = tmpdir, out, data, keep
        self.path = tmpdir / out.name
        self.reserved = reservation(out.parent / data) if data else None    # the name's marker, until published

    def publish(self):
        moved = False
        final = self.out.parent / self.data if self.data else None
        try:
            stale = _stale_data(self.out, self.keep | ({final.resolve()} if final else set()))
            if final is not None:
                files.publish(self.dir / self.data, final, exclusive=True)
                moved = True
            files.publish(self.path, self.out)
        except BaseException as exc:      # unless the model was renamed, none reads the new data: take it back
            if moved and self.path.exists():
                final.unlink(missing_ok=True)
            self.discard()
            if isinstance(exc, OSError):
                raise files.write_error(self.out, exc) from None
            raise
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


RESERVED = ".onnxprune-reserved"


def reservation(path: Path) -> Path:
    """The hidden marker that reserves data file name ``path`` while a run writes it (``_data_name``)."""
    return path.parent / f".{path.name}{RESERVED}"


def _data_name(out: Path, avoid: set[Path]) -> str:
    """A data file name for ``out`` that names no existing file and none of ``avoid``, reserved by its hidden
    marker (``reservation``), created exclusively and holding this process's id: two runs never get the same
    name, and a run killed outright (SIGKILL, a power cut) leaves nothing under the final name, only a marker
    that the next run takes over once its process is gone."""
    for n in range(1000):
        name = f"{out.name}.data" if n == 0 else f"{out.name}.{n}.data"
        path = out.parent / name
        if path.resolve() in avoid or os.path.lexists(path):
            continue
        if _claim(reservation(path)):
            if os.path.lexists(path):          # taken by someone who does not reserve names, in between
                reservation(path).unlink(missing_ok=True)
                continue
            return name
    raise OutputError(f"{out.parent}: too many {out.name}.N.data files; remove the old ones")


def _claim(marker: Path) -> bool:
    """Create ``marker`` exclusively with this process's id; take over one whose process has ended."""
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if _held(marker):
                return False
            marker.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise files.write_error(marker.parent / marker.name[1:-len(RESERVED)], exc) from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _held(marker: Path) -> bool:
    """Whether the run that wrote ``marker`` may still be writing: its process exists, or it is too new to
    have written its id (a marker left empty by a run killed at once is free after a minute)."""
    import time
    import psutil
    try:
        text = marker.read_text().strip()
        age = time.time() - marker.stat().st_mtime
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not text.isdigit():
        return age < 60
    return psutil.pid_exists(int(text))


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
    whole = lazy and inline_from is not None and fits_inline(model, Path(external_dir))
    external = (external or lazy or model.ByteSize() > TWO_GB) and not whole
    keep = frozenset(Path(p).resolve() for p in keep)
    if out.resolve() in keep:
        keep = frozenset()
    data = _data_name(out, {Path(p).resolve() for p in avoid} | keep) if external else None
    with files.undone_on_failure(lambda: data and reservation(out.parent / data).unlink(missing_ok=True), out):
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    staged = Staged(tmpdir, out, data, keep)
    with files.undone_on_failure(staged.discard, out):
        if whole:
            inline.write_inline(model, staged.path, external_dir)
        elif lazy:
            stream_external(model, tmpdir / staged.data, staged.data, Path(external_dir))
            onnx.save(model, str(staged.path))
        elif external:
            onnx.save(model, str(staged.path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=staged.data, size_threshold=1024)
        else:
            onnx.save(model, str(staged.path))
    return staged


def save_model_atomic(model: onnx.ModelProto, out: Path, external: bool = False,
                      external_dir: str | os.PathLike | None = None):
    """``stage_model`` and publish: never half a model in place, and a fresh data file."""
    stage_model(model, out, external, external_dir).publish()
