"""Calibration data from real text: files (or folders of them) -> ``DATA.npz`` that fits the model's inputs.

The text is tokenized with the model's own tokenizer (``tokenizer.json`` beside the model, as GenAI and
Optimum folders ship it, or ``--tokenizer``) through Hugging Face's ``tokenizers`` library (a fast, well-kept
reader of that format; writing one by hand would be a tokenizer zoo), its token ids concatenated file by file
and cut into windows of ``seq`` tokens. Each graph input is then made as the graph wants it: token ids,
all-ones attention masks, position ids ``0 .. seq-1``, zero token types, and a KV cache's past inputs empty
(a past of 0 tokens: the prompt step). An input that text cannot give (pixels, audio, a float embedding) is
named, with every other one, in one error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import InputError
from ..inputs import input_shapes, plain_input

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py", ".html", ".json", ".csv", ""}


def find_tokenizer(model_path: Path, given: Path | None = None) -> Path:
    """``given``, else ``tokenizer.json`` beside the model or in the folder above it."""
    if given is not None:
        given = Path(given)
        path = given / "tokenizer.json" if given.is_dir() else given
        if not path.is_file():
            raise InputError(f"--tokenizer {given}: no tokenizer.json there")
        return path
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise InputError(f"no tokenizer.json beside {model_path}; give the model's tokenizer with --tokenizer "
                     "PATH (a tokenizer.json, or the folder that holds it)")


def text_files(paths) -> list[Path]:
    """The files named, and the text files of the folders named (recursively, in sorted order)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    if not found:
        raise InputError(f"no text files in {', '.join(map(str, paths))}")
    return found


def tokenize(tokenizer_path: Path, files) -> np.ndarray:
    """Every file's token ids (special tokens as the tokenizer adds them), concatenated."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("calibration data from text needs the tokenizers package: pip install tokenizers") \
            from None
    try:
        tok = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:        # the library's own error types
        raise InputError(f"{tokenizer_path}: not a tokenizer the tokenizers library reads "
                         f"({str(exc).splitlines()[0][:120]})") from None
    # a tokenizer.json made for inference cuts every text at its max_length (sentence-transformers ship 128 or
    # 256) and pads it: a whole file is one text here, cut into windows later
    tok.no_truncation()
    tok.no_padding()
    ids = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        try:
            ids.extend(tok.encode(text).ids)
        except Exception as exc:
            raise InputError(f"{f}: the tokenizer cannot encode it ({str(exc).splitlines()[0][:120]})") from None
    return np.asarray(ids, dtype=np.int64)


def text_calibration(model: onnx.ModelProto, ids: np.ndarray, seq: int, samples: int,
                     vocab: int | None = None) -> dict[str, np.ndarray]:
    """``samples`` windows of ``seq`` tokens of ``ids`` (as many as there are, if fewer), and every graph input
    the model wants made from them."""
    windows = len(ids) // seq
    if windows < 1:
        raise InputError(f"the text gives {len(ids)} tokens, fewer than one window of --seq {seq}; give more text "
                         "or a smaller --seq")
    n = min(windows, samples)
    tokens = ids[:n * seq].reshape(n, seq)
    if vocab is not None and tokens.max() >= vocab:
        raise InputError(f"the tokenizer gives token id {int(tokens.max())}, beyond the model's {vocab} embedding "
                         "rows: it is not this model's tokenizer")
    shapes = input_shapes(model, n, seq, past=0)
    inits = {i.name for i in model.graph.initializer}
    data, unfit = {}, []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = shapes[inp.name]
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if "past" in inp.name.lower() or 0 in shape[1:]:
            data[inp.name] = np.zeros(shape, dtype=dtype)            # an empty KV cache
        elif (value := plain_input(inp.name, dtype, shape)) is not None:
            data[inp.name] = value
        elif np.issubdtype(dtype, np.integer) and shape == [n, seq]:
            data[inp.name] = tokens.astype(dtype)
        else:
            unfit.append(f"{inp.name} ({dtype.name} {shape})")
    if unfit:
        raise InputError(f"text cannot give the graph input(s) {', '.join(unfit)}; make DATA.npz with one array "
                         "per graph input (onnxprune inspect lists them)")
    return data


def embedding_rows(model: onnx.ModelProto) -> int | None:
    """The rows of the table that the token ids index (the first Gather on a graph input), if found."""
    inputs = {i.name for i in model.graph.input}
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in inputs \
                and node.input[0] in inits and "ids" in node.input[1].lower():
            return int(inits[node.input[0]].dims[0])
    return None
