"""Files beside the model: paths checked before any work, JSON read with one-line errors, and a file
written into place atomically (``StagedFile``). The model's own writing is ``model/save.py``'s."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError, OutputError


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


def publish(tmp: str | Path, out: Path, exclusive: bool = False):
    """Rename ``tmp`` onto ``out`` with the permissions a plain open() would give (mkstemp makes 0600).

    ``exclusive``: ``out`` must not exist (a data file name reserved by its marker, ``save._data_name``): a hard
    link is made rather than a rename, which fails rather than clobbers if a file took the name in between."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if exclusive:
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise OutputError(f"{out}: another program took this data file name while this run was writing; "
                              "run again") from None
        except OSError:               # no hard links on this filesystem
            if os.path.lexists(out):
                raise OutputError(f"{out}: another program took this data file name while this run was "
                                  "writing; run again") from None
            os.replace(tmp, out)
        else:
            os.unlink(tmp)
        return
    os.replace(tmp, out)


def write_error(path, exc: OSError) -> OutputError:
    """An OSError met while writing ``path``, as one line (a full disk, a read-only or vanished folder)."""
    return OutputError(f"{path}: could not write ({exc.strerror or exc}); nothing written")


class StagedFile:
    """One file (a JSON report, a config, a copy of a tokenizer file) written beside its destination, renamed
    into place by ``publish()``. ``content``: the bytes, or a file to copy."""

    def __init__(self, out: Path, content: bytes | Path):
        out = Path(out)
        self.out = out
        with undone_on_failure(lambda: None, out):
            fd, self.tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        with undone_on_failure(self.discard, out), os.fdopen(fd, "wb") as f:
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


@contextlib.contextmanager
def undone_on_failure(undo, path):
    """Run ``undo`` when the block fails in any way (a signal too), and report an OSError as one line."""
    try:
        yield
    except OSError as exc:
        undo()
        raise write_error(path, exc) from None
    except BaseException:
        undo()
        raise
