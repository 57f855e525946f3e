"""Calibration on ONNX Runtime: the one instrumented session that calibrated importance methods
(``importance/activation.py``, ``ablation.py``, ``mean_ablation.py``, ``residual.py``) and compensation
(``transforms/compensate.py``) share.

The output-projection weights and biases become graph inputs of a working copy, so that a head is masked,
or a block's projection refitted, by feeding other arrays, never by building a model per head. The context
that each output projection reads (the concatenated heads) is captured by adding it as a graph output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .block import AttentionBlock
from .errors import InputError, PlanError
from .progress import Progress
from .model.proto import consumers as graph_consumers, own_constant, own_weights
from .inputs import checked_array

BATCH = 16


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
    missing = [n for n in needed if n not in data]
    if missing:
        raise InputError(f"{path}: no array for graph input {missing[0]!r} (it has {', '.join(data) or 'none'})")
    extra = [k for k in data if k not in inputs]
    if extra:
        raise InputError(f"{path}: array {extra[0]!r} is not a graph input (inputs: {', '.join(needed)})")
    counts = {len(a) if a.ndim else 0 for a in data.values()}
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


@dataclass
class _Site:
    """Where one block's output projection is: its weight and bias names, the context it reads."""

    block: AttentionBlock
    weight: str
    bias: str | None
    context: str
    head_axis: int


def _find_sites(model: onnx.ModelProto, blocks) -> list[_Site]:
    consumers = graph_consumers(model)
    inits = {i.name: i for i in model.graph.initializer}
    sites = []
    for b in blocks:
        w = b.o_proj.weight
        mine = {t.name for t in b.tensors}     # a weight shared by blocks (ALBERT) has one reader in each:
        readers = [n for n in consumers.get(w, []) if n.op_type in ("MatMul", "Gemm")]    # the one fed by
        node = next((n for n in readers if any(i in mine for i in n.input if i != w)),      # this block
                    readers[0] if readers else None)
        if node is None:
            raise PlanError(f"block {b.index} ({b.name}): its output projection is not a MatMul or Gemm")
        context = node.input[0] if node.input[1] == w else node.input[1]
        bias = None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            bias = node.input[2]
        elif node.op_type == "MatMul":
            adds = consumers.get(node.output[0], [])
            if len(adds) == 1 and adds[0].op_type == "Add":
                other = [i for i in adds[0].input if i != node.output[0]]
                if other and other[0] in inits and len(inits[other[0]].dims) == 1:
                    bias = other[0]
        sites.append(_Site(b, w, bias, context, b.o_proj.head_axis))
    return sites


def _add_bias(model: onnx.ModelProto, site: _Site) -> str:
    """Give a bias-free output projection a zero bias (an Add after it), for compensation to write into."""
    node = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and site.weight in n.input)
    w = _initializer(model, site.weight)
    width = w.dims[1 - site.head_axis] if len(w.dims) == 2 else w.dims[-1]
    name = f"{site.weight}.onnxprune_bias"
    model.graph.initializer.append(numpy_helper.from_array(
        np.zeros(width, dtype=helper.tensor_dtype_to_np_dtype(w.data_type)), name))
    out = node.output[0]
    node.output[0] = f"{out}.onnxprune_unbiased"
    at = list(model.graph.node).index(node) + 1
    model.graph.node.insert(at, helper.make_node("Add", [node.output[0], name], [out],
                                                 name=f"{node.name or out}.onnxprune_bias"))
    return name


def _private_copy(model: onnx.ModelProto, site: _Site, name: str, value: np.ndarray) -> str:
    """Make ``site``'s projection (or its bias Add) read a copy of ``name`` (whose value is ``value``) that
    no other block reads, so that masking or refitting one block leaves the others alone; returns the
    copy's name."""
    copy = numpy_helper.from_array(value, f"{name}.onnxprune_block{site.block.index}")
    model.graph.initializer.append(copy)
    proj = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and site.context in n.input
                and site.weight in n.input)
    node = proj if name in proj.input else next(n for n in model.graph.node
                                                 if n.op_type == "Add" and proj.output[0] in n.input)
    node.input[list(node.input).index(name)] = copy.name
    if site.weight == name:
        site.weight = copy.name
    else:
        site.bias = copy.name
    return copy.name


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    """``name``'s tensor as an initializer of its own (a Constant node becomes one), to move or edit."""
    return own_constant(model, name, initializer=True)


def head_columns(block: AttentionBlock, name: str, heads) -> np.ndarray:
    """Positions along ``name``'s head axis that belong to ``heads`` (one-head units only). A block's
    private copy of a shared output projection (see ``_private_copy``) has the projection's positions."""
    t = next((t for t in block.tensors if t.name == name), None) or block.tensor(block.o_proj.weight)
    units = [u for u, hs in enumerate(block.units) if len(hs) == 1 and next(iter(hs)) in set(heads)]
    return np.flatnonzero(np.isin(t.owner, units))


class Calibrator:
    """Runs ``model`` on calibration batches with the output projections as inputs. ``outputs=False``: the
    heads' contexts only (what activation scores and compensation read), never the model's outputs."""

    def __init__(self, model: onnx.ModelProto, blocks, data: list[dict[str, np.ndarray]], external_dir=None,
                 progress: bool = True, outputs: bool = True):
        from .runtime import session
        self.model = model
        self.blocks = list(blocks)
        self.data = data
        self.progress = progress
        work = onnx.ModelProto()
        work.CopyFrom(model)
        own_weights(work, [b.o_proj.weight for b in self.blocks])   # shared through Identity: a copy each
        self.sites = _find_sites(work, self.blocks)
        self.weights: dict[str, np.ndarray] = {}
        self.shared = set()         # blocks whose output projection another block reads too (ALBERT)
        for s in self.sites:
            if s.bias is None:
                s.bias = _add_bias(work, s)
            for name in (s.weight, s.bias):
                if name in self.weights:        # shared by blocks: this block reads a copy of its own here
                    self.shared.add(s.block.index)
                    name = _private_copy(work, s, name, self.weights[name])
                proto = _initializer(work, name)
                self.weights[name] = numpy_helper.to_array(proto, base_dir=str(external_dir or ""))
                work.graph.initializer.remove(proto)
                work.graph.input.append(helper.make_tensor_value_info(name, proto.data_type, list(proto.dims)))
        if not outputs:       # contexts only: ONNX Runtime drops what only the outputs needed
            del work.graph.output[:]
        self.outputs = [o.name for o in work.graph.output]
        known = set(self.outputs)
        for s in self.sites:
            if s.context not in known:
                work.graph.output.append(helper.make_empty_tensor_value_info(s.context))
                known.add(s.context)
        self.work = work
        # graph optimizations on: calibration reads statistics, not an exact proof, and runs many times
        self.session = session(work, external_dir=external_dir, optimize=True)
        self.mask_input = next((i.name for i in model.graph.input if "attention_mask" in i.name
                                and len(i.type.tensor_type.shape.dim) == 2), None)

    # ------------------------------------------------------------------ running
    def run(self, feeds: dict, weights: dict | None = None, contexts: bool = False):
        from .runtime import ort_reason
        names = self.outputs + ([s.context for s in self.sites] if contexts else [])
        try:
            got = self.session.run(names, {**feeds, **self.weights, **(weights or {})})
        except Exception as exc:   # onnxruntime's own types: token ids out of range, wrong sizes
            raise InputError(f"onnxruntime could not run the model on the calibration data: {ort_reason(exc)}") \
                from None
        return dict(zip(names, got))

    def rows(self, feeds: dict, ctx: np.ndarray, site: _Site) -> np.ndarray:
        """The context as [tokens, features], the padding tokens left out where the mask says so."""
        ax = site.block.tensor(site.context).axes
        if len(ax) != 1:
            raise PlanError(f"block {site.block.index}: its context carries heads on several axes")
        x = np.moveaxis(ctx, ax[0], -1)
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        if self.mask_input is not None and self.mask_input in feeds:
            mask = np.asarray(feeds[self.mask_input]).reshape(-1) != 0
            if mask.size == rows.shape[0]:
                rows = rows[mask]
        return rows

    def loss(self, ref: dict, got: dict) -> float:
        """How far ``got`` is from ``ref``: for a language model's logits, the mean KL divergence of the
        next-token distributions (what its users judge: a shift of every logit changes nothing); for any
        other output, the relative squared error."""
        if not self.outputs:
            raise PlanError("this calibration session computes the heads' contexts only, not the outputs a loss "
                            "needs")
        total = 0.0
        for name in self.outputs:
            r = ref[name]
            if r.dtype.kind != "f" or not r.size:
                continue
            if is_logits(name, r):
                total += next_token_kl(r, got[name])
                continue
            d = got[name].astype(np.float64) - r
            total += float(np.sum(d * d)) / max(float(np.sum(r.astype(np.float64) ** 2)), 1e-30)
        return total

    def bar(self, total: int, what: str):
        return Progress(total, what, min_total=1 if self.progress else total + 1, unit="runs")

    # ------------------------------------------------------------------ what the methods share
    head_columns = staticmethod(head_columns)

    def context_covariances(self) -> dict[int, np.ndarray]:
        """Each block's context covariance (centred) over the calibration tokens, [width, width]."""
        sums, grams, n = {}, {}, {}
        with self.bar(len(self.data), "calibrating") as bar:
            for feeds in self.data:
                out = self.run(feeds, contexts=True)
                for s in self.sites:
                    rows = self.rows(feeds, out[s.context], s)
                    b = s.block.index
                    sums[b] = sums.get(b, 0) + rows.sum(axis=0)
                    grams[b] = grams.get(b, 0) + rows.T @ rows
                    n[b] = n.get(b, 0) + len(rows)
                bar.update()
        return {b: (grams[b] - np.outer(sums[b], sums[b]) / max(n[b], 1)) / max(n[b], 1) for b in grams}

    def context_means(self, weights: dict | None = None) -> dict[int, np.ndarray]:
        """The mean context vector of every block over the calibration tokens."""
        acc, n = {}, {}
        for feeds in self.data:
            out = self.run(feeds, weights, contexts=True)
            for s in self.sites:
                rows = self.rows(feeds, out[s.context], s)
                acc[s.block.index] = acc.get(s.block.index, 0) + rows.sum(axis=0)
                n[s.block.index] = n.get(s.block.index, 0) + len(rows)
        return {b: acc[b] / max(n[b], 1) for b in acc}

    # ------------------------------------------------------------------ shortcuts (tools, tests)
    def importance(self, method: str) -> dict[int, np.ndarray]:
        """The scores of calibrated method ``method`` (see ``importance.SOURCES``) on this session."""
        from .importance import CALIBRATED, SOURCES, ImportanceContext
        if method not in CALIBRATED:
            raise PlanError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATED)}")
        scores = SOURCES[method].score(ImportanceContext(self.model, tuple(self.blocks), None,
                                                          _calibration=self))
        for s in self.sites:
            finite(scores[s.block.index], f"block {s.block.index} ({s.block.name}): its {method} scores")
        return scores

    def compensate(self, kept: dict[int, tuple], mode: str, report: list | None = None) -> dict[str, np.ndarray]:
        from .transforms.compensate import compensation
        return compensation(self, kept, mode, report=report)

    def edited_model(self, model: onnx.ModelProto, new: dict[str, np.ndarray]) -> onnx.ModelProto:
        from .transforms.compensate import with_weights
        return with_weights(model, self, new)


VOCABULARY = 1000      # an output [B, S, V] named like logits with V this large is a language model's


def is_logits(name: str, value: np.ndarray) -> bool:
    return "logit" in name.lower() and value.ndim == 3 and value.shape[-1] >= VOCABULARY


def next_token_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(got)), 32 positions at a time (a vocabulary of
    262144 makes whole batches large in float64)."""
    r2, g2 = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    total = 0.0
    for i in range(0, len(r2), 32):
        lr = _log_softmax(r2[i:i + 32].astype(np.float64))
        lg = _log_softmax(g2[i:i + 32].astype(np.float64))
        total += float(np.sum(np.exp(lr) * (lr - lg)))
    return total / max(len(r2), 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def finite(values: np.ndarray, what: str):
    """Calibration must give numbers: a NaN or inf (from data the model overflows on, say) stops the run."""
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what}: not finite (NaN or inf) on the calibration data, which the model "
                         "overflows or divides by zero on; check the data")
