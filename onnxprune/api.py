"""The pipeline: load -> match -> score -> plan -> rewrite -> verify. ``prune_model`` is the library entry."""

from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import plan as planning
from .block import AttentionBlock, MatchResult
from .errors import MatchError, OnnxPruneError, PlanError
from .gates import find_gates, fold_gates
from .io import FLOAT_TYPES, as_model, attach_external, to_graph
from .match import match_graph
from .probe import probe, synth_inputs
from .rewrite import Rewriter, check_model, dead_nodes, export
from .score import (stored_method, check_heads_to_prune, initializer_importance, load_importance_file, carry_importance,
                    weight_importance)
from .verify import compare, masked_model, masked_weights, worst_of

from .calibrate import COMPENSATE_MODES, IMPORTANCE_METHODS  # noqa: E402

IMPORTANCE_SOURCES = ("weights", "initializers") + IMPORTANCE_METHODS


@dataclass
class PruneResult:
    model: onnx.ModelProto
    blocks: tuple[AttentionBlock, ...]
    kept: dict[int, tuple[int, ...]]
    min_heads_applied: dict[int, bool]
    importance: dict[int, np.ndarray]
    params_before: int
    params_after: int
    max_error: float | None = None
    misses: tuple = field(default_factory=tuple)
    gqa: str = "uniform"          # how grouped-query blocks were planned: uniform or group
    io_keep: dict = field(default_factory=dict)   # graph inputs/outputs that lost heads: {name: {axis: kept}}
    kv_cache: bool = False        # the model takes and returns a KV cache (its head dimension changed)
    importance_source: str = "weights"   # where the scores came from (see score.describe_source)
    compensate: str | None = None        # bias or refit: the output projections were recovered
    gates: int = 0                       # head gates folded into the output projections
    multiple_of: int | None = None       # kept heads x head size rounded up to a multiple of this
    macs: tuple | None = None            # (MacCount before, MacCount after), from ``count_result_macs``
    macs_note: str | None = None         # why the MACs could not be counted


def count_result_macs(model: onnx.ModelProto, result: PruneResult, batch: int = 1, seq: int = 128,
                      external_dir: str | os.PathLike | None = None, shrink: bool = False) -> PruneResult:
    """Count the MACs of ``model`` and of ``result.model`` at ``batch`` x ``seq`` into ``result.macs``
    (per block and in total). If the model cannot run at that size (a short position table), say why in
    ``result.macs_note``; with ``shrink``, first try half the length, down to 8."""
    from .macs import block_nodes, count_macs
    model, external_dir = as_model(model, external_dir)
    if not isinstance(result, PruneResult):
        raise TypeError(f"result must be the PruneResult of prune_model, not {type(result).__name__}")
    names = block_nodes(model, result.blocks)
    first_error, length = None, seq
    while True:
        try:
            before = count_macs(model, result.blocks, batch, length, external_dir, names)
            after = before if result.model is model else \
                count_macs(result.model, result.blocks, batch, length, external_dir, names)
            result.macs = (before, after)
            if first_error is not None:
                result.macs_note = f"the model does not run at seq {seq}; MACs counted at seq {length}"
            return result
        except OnnxPruneError as exc:
            first_error = first_error or str(exc).split("synthetic inputs: ")[-1]
            if not shrink or length // 2 < 8:
                result.macs_note = (f"MACs not counted: the model does not run at batch {batch}, seq {seq} "
                                    f"({first_error})")
                return result
            length //= 2


def count_params(model: onnx.ModelProto) -> int:
    """Floating-point elements in initializers and Constant nodes; integer shape and index constants are not
    parameters."""
    def size(t: onnx.TensorProto) -> int:
        return int(np.prod(t.dims)) if t.data_type in FLOAT_TYPES else 0

    from .score import IMPORTANCE_SUFFIX, IMPORTANCE_TABLE
    total = sum(size(t) for t in model.graph.initializer
                if not (t.name.endswith(IMPORTANCE_SUFFIX) or t.name == IMPORTANCE_TABLE))   # scores, not weights
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(size(a.t) for a in node.attribute if a.name == "value")
    return total


def inspect_model(model: onnx.ModelProto, external_dir: str | os.PathLike | None = None) -> MatchResult:
    """The attention blocks of ``model`` and the explained misses (``model`` and ``external_dir`` as in
    prune_model)."""
    model, external_dir = as_model(model, external_dir)
    graph = to_graph(model)
    shapes, values = probe(model, external_dir=external_dir)
    return match_graph(graph, shapes, values)


UNSUPPORTED_OPS = {
    "MatMulNBits": "its weights are int4/int8 blocks (ORT GenAI builder -p int4); prune the fp32 or fp16 "
                   "model, then quantize it (onnxruntime.quantization.matmul_nbits_quantizer)",
}


def _refuse_unsupported(model: onnx.ModelProto):
    """Say it at once, before any work, when the model holds an op that pruning cannot rewrite yet."""
    for node in model.graph.node:
        why = UNSUPPORTED_OPS.get(node.op_type)
        if why:
            raise MatchError(f"{node.op_type} node {node.name or node.output[0]!r} is not supported yet: {why}")


def prune_model(model: onnx.ModelProto, ratio=None, *, kept: dict[int, list[int]] | None = None,
                heads_to_prune: dict[int, list[int]] | None = None, min_heads: int = 1,
                importance: dict[int, np.ndarray] | str | None = None, verify: bool = True,
                feeds: dict | None = None, gqa: str | None = None, scope: str = "layer",
                threshold: float | None = None, calib: dict[str, np.ndarray] | None = None,
                compensate: str | None = None, importance_initializer: str | None = None,
                external_dir: str | os.PathLike | None = None, multiple_of: int | None = None) -> PruneResult:
    """Prune ``model``. Give ``ratio`` (with optional per-block ``importance``), or explicit ``kept`` heads,
    or ``heads_to_prune`` (the heads to remove, Hugging Face style). Blocks not named keep every head.

    ``importance``: {block index: scores}, or a source: "weights" (data-free), "initializers" (scores stored
    in the model, see ``score.IMPORTANCE_SUFFIX``; ``importance_initializer`` names them), or a calibration
    method ("activation", "ablation", "mean-ablation", "residual"; see ``calibrate``) run on ``calib`` ({graph input:
    samples along axis 0}; synthetic inputs when None). By default: the model's importance initializers
    when it has them, else "weights". ``compensate`` ("bias" or "refit") then recovers what the dropped
    heads contributed, on the same calibration data, before the model is pruned.

    ``scope``: "layer" keeps the same fraction in every block; "global" ranks the heads of all blocks together
    (scores normalised per block). ``threshold`` (instead of a ratio) keeps every head scoring at least it.

    ``gqa`` ("group" or "uniform") says how a ratio is applied to grouped-query blocks; by default
    "group" when the model has a KV cache (whole KV heads go, so the cache shrinks), else "uniform".

    ``multiple_of``: round each block's kept count up, with its next best heads, so that kept heads x head
    size is a multiple of it (aligned widths for hardware that wants them).

    ``model``: an ``onnx.ModelProto``, a path to an .onnx file (loaded and checked; external data stays on
    disk) or the bytes of a model; anything else raises ``ModelTypeError`` (an ``InputError`` and a
    ``TypeError``). ``external_dir``: give it when ``model`` was loaded with ``load_external_data=False``, as
    the folder of its data files. Only the attention weights are then read into memory; every other tensor
    stays a reference to the original data file (``io.save_model_atomic`` copies those bytes by streaming).

    Errors are ``OnnxPruneError`` subclasses (``errors.py``), each with one-line text.
    ``result.max_error`` is the largest difference from the masked original: NaN or inf when either gives
    non-finite outputs, which fails every tolerance."""
    model, external_dir = as_model(model, external_dir)
    if sum(x is not None for x in (ratio, kept, heads_to_prune, threshold)) != 1:
        raise PlanError("give exactly one of ratio, threshold, kept, heads_to_prune")
    if multiple_of is not None and ratio is None and threshold is None:
        raise PlanError("--multiple-of rounds the plans of --ratio and --threshold, not a list of heads")
    if threshold is not None and not _finite_number(threshold):
        raise PlanError(f"threshold must be a finite number, got {threshold!r}")
    if scope not in planning.SCOPES:
        raise PlanError(f"unknown scope {scope!r}; use one of {', '.join(planning.SCOPES)}")
    if ratio is not None:
        try:
            planning.exact_ratio(ratio)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
    _refuse_unsupported(model)
    graph = to_graph(model)
    feeds = feeds if feeds is not None else synth_inputs(model)
    shapes, values = probe(model, feeds, external_dir)
    result = match_graph(graph, shapes, values)
    if not result.blocks:
        detail = "; ".join(f"{m.node}: {m.reason}" for m in result.misses[:3])
        raise MatchError(f"0 attention blocks found ({detail})")
    blocks = result.blocks
    if external_dir is not None:
        attach_external(graph, external_dir)
    kv_cache = any(t.io for b in blocks for t in b.tensors)
    gqa = gqa or ("group" if kv_cache else "uniform")
    gates = find_gates(model, blocks)
    if gates:       # fold them into the output projections, prune the gate-free model, by the gates if asked
        folded = fold_gates(model, blocks, gates)
        by_gate = {}
        for g in gates:
            by_gate[g.block] = by_gate.get(g.block, 1.0) * np.abs(np.asarray(g.values))
        use = importance is None and initializer_importance(model, blocks, importance_initializer) is None
        out = prune_model(folded, ratio, kept=kept, heads_to_prune=heads_to_prune, min_heads=min_heads,
                          importance=by_gate if use else importance, verify=verify, feeds=feeds, gqa=gqa,
                          scope=scope, threshold=threshold, calib=calib, compensate=compensate,
                          importance_initializer=importance_initializer, external_dir=external_dir,
                          multiple_of=multiple_of)
        out.gates = len(gates)
        if use and out.importance_source == "given":
            out.importance_source = "gates"
        return out
    if heads_to_prune is not None:
        check_heads_to_prune(heads_to_prune, blocks)
    scores, plans, applied = {}, {}, {}
    source = "given" if isinstance(importance, dict) else importance
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith((".json", ".npy"))):
        source = "file"
    elif isinstance(source, str) and source not in IMPORTANCE_SOURCES + ("given",):
        raise PlanError(f"unknown importance source {source!r}; use one of {', '.join(IMPORTANCE_SOURCES)}, "
                        "or a .json/.npy file")
    if compensate is not None and compensate not in COMPENSATE_MODES:
        raise PlanError(f"unknown compensation {compensate!r}; use one of {', '.join(COMPENSATE_MODES)}")
    calibrator = None
    if ratio is not None or threshold is not None:
        if source == "file":
            importance = load_importance_file(importance, blocks)
        elif not isinstance(importance, dict):
            stored = initializer_importance(model, blocks, importance_initializer) \
                if source in (None, "initializers") else None
            if source == "initializers" and stored is None:
                raise PlanError("the model has no importance initializers"
                                + (f" matching {importance_initializer!r}" if importance_initializer else ""))
            if stored is not None:
                method = stored_method(model)
                importance, source = stored, f"initializers ({method})" if method else "initializers"
            elif source in (None, "weights"):
                importance, source = {}, "weights"
            else:
                calibrator = _calibrator(model, blocks, calib, external_dir)
                importance = calibrator.importance(source)
        try:
            scores = {b.index: np.asarray(importance[b.index], dtype=np.float64) if b.index in importance
                      else weight_importance(b, graph) for b in blocks}
        except (TypeError, ValueError) as exc:
            raise PlanError(f"importance scores must be numbers ({exc})") from None
        for b in blocks:
            if scores[b.index].shape != (b.num_heads,):
                raise PlanError(f"block {b.index} ({b.name}): {scores[b.index].size} importance scores for "
                                f"{b.num_heads} heads")
            bad = np.flatnonzero(~np.isfinite(scores[b.index]))
            if bad.size:
                raise PlanError(f"block {b.index} ({b.name}): head {bad[0]} has importance "
                                f"{scores[b.index][bad[0]]} ({source or 'given'}); scores must be finite")
    if threshold is not None or (ratio is not None and scope == "global"):
        try:
            joint = planning.plan_model(scores, {b.index: b.kv_groups for b in blocks}, ratio=ratio,
                                        threshold=threshold, min_heads=min_heads, gqa=gqa)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        for b in blocks:
            plans[b.index], applied[b.index] = joint[b.index].kept_heads, joint[b.index].min_heads_applied
    for b in blocks:
        if plans.get(b.index) is not None:
            continue
        if ratio is not None:
            try:
                bp = planning.plan_block(scores[b.index], ratio, b.kv_groups, min_heads, gqa)
            except ValueError as exc:
                raise PlanError(f"block {b.index} ({b.name}): {exc}") from None
            plans[b.index], applied[b.index] = bp.kept_heads, bp.min_heads_applied
        elif kept is not None:
            plans[b.index] = tuple(sorted(set(kept.get(b.index, range(b.num_heads)))))
            applied[b.index] = False
        else:
            drop = set(heads_to_prune.get(b.index, ()))
            plans[b.index] = tuple(h for h in range(b.num_heads) if h not in drop)
            applied[b.index] = False
    if multiple_of is not None:
        for b in blocks:
            try:
                plans[b.index] = planning.align_heads(plans[b.index], scores[b.index], b.kv_groups, b.head_dim,
                                                      multiple_of, gqa)
            except (PlanError, ValueError) as exc:
                raise PlanError(f"--multiple-of {multiple_of}: block {b.index} ({b.name}): {exc}") from None
    if compensate is not None:
        if heads_to_prune is not None or kept is not None or any(
                plans[b.index] != tuple(range(b.num_heads)) for b in blocks):
            calibrator = calibrator or _calibrator(model, blocks, calib, external_dir)
            edited = calibrator.edited_model(model, calibrator.compensate(plans, compensate))
            del graph
            out = prune_model(edited, kept=plans, verify=verify, feeds=feeds, gqa=gqa, external_dir=external_dir)
            out.importance, out.min_heads_applied = scores, applied
            out.importance_source, out.compensate = source or "given", compensate
            out.multiple_of = multiple_of
            out.params_before = count_params(model)
            return out
    dead = dead_nodes(graph)
    rewriter = Rewriter(graph, shapes, values)
    for b in blocks:
        rewriter.plan(b, plans[b.index])       # every check first ...
    rewriter.commit()                           # ... then every edit
    with contextlib.chdir(external_dir or "."):    # the checker finds external data files from there
        pruned = check_model(export(graph, model, dead), model) if any(
            plans[b.index] != tuple(range(b.num_heads)) for b in blocks) else model
    if pruned is not model:
        carry_importance(model, pruned, blocks, plans)
    out = PruneResult(pruned, blocks, plans, applied, scores, count_params(model), count_params(pruned),
                      misses=result.misses, gqa=gqa, kv_cache=kv_cache,
                      io_keep=rewriter.io_keep, importance_source=source or "given", multiple_of=multiple_of)
    del graph, rewriter, dead         # the sliced weights now live in ``pruned`` only: free the graph's copies
    release_memory()
    if verify:
        masked = masked_model(model, list(blocks), plans, external_dir)
        out.max_error = worst_of(compare(masked, pruned, f, out.io_keep, external_dir)
                                 for f in _verification_feeds(model, feeds, out.io_keep))
    return out


def _finite_number(x) -> bool:
    if isinstance(x, (bool, str, bytes)):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _calibrator(model, blocks, calib, external_dir):
    from .calibrate import Calibrator, batches
    data = calib if calib is not None else synth_calibration(model)
    return Calibrator(model, blocks, batches(data), external_dir)


def synth_calibration(model: onnx.ModelProto, samples: int = 32, seq: int = 16) -> dict[str, np.ndarray]:
    """Synthetic calibration data when none is given: random tokens or values, as the probe makes them."""
    return synth_inputs(model, seed=7, batch=samples, seq=seq)


def release_memory():
    """Collect, and hand freed heap back to the system (glibc keeps it otherwise), before ONNX Runtime loads
    a large model's weights for verification."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _verification_feeds(model: onnx.ModelProto, feeds: dict | None, io_keep: dict) -> list[dict]:
    runs = [feeds if feeds is not None else synth_inputs(model)]
    if io_keep:            # a KV cache: also a decode step on a non-empty past
        runs.append(synth_inputs(model, seed=1, batch=1, seq=1, past=3))
    return runs


def verify_saved(model: onnx.ModelProto, result: PruneResult, path: str | os.PathLike,
                 external_dir: str | os.PathLike | None = None, feeds: dict | None = None) -> float:
    """Pruning equals masking, checked on the pruned model as written at ``path`` (with its data file beside
    it) rather than in memory: for a large model, neither model's weights are then held by Python while
    ONNX Runtime runs the other."""
    release_memory()
    pruned = onnx.load(str(path), load_external_data=False)
    overrides = masked_weights(model, list(result.blocks), result.kept, external_dir)
    masked = model if overrides is not None else masked_model(model, list(result.blocks), result.kept,
                                                              external_dir)
    return worst_of(compare(masked, pruned, f, result.io_keep, external_dir, pruned_dir=os.path.dirname(path),
                            masked_overrides=overrides)
                    for f in _verification_feeds(model, feeds, result.io_keep))



def score_model(model: onnx.ModelProto, method: str = "weights", *, calib: dict | None = None,
                external_dir: str | os.PathLike | None = None
                ) -> tuple[onnx.ModelProto, tuple[AttentionBlock, ...], dict[int, np.ndarray]]:
    """Score every head by ``method`` and return (a copy of ``model`` with the scores stored as importance
    initializers, the blocks, the scores). Pruning the copy later uses them with no data."""
    from .score import store_importance
    model, external_dir = as_model(model, external_dir)
    if method not in IMPORTANCE_SOURCES or method == "initializers":
        raise PlanError(f"unknown scoring method {method!r}; use one of "
                        f"{', '.join(m for m in IMPORTANCE_SOURCES if m != 'initializers')}")
    result = inspect_model(model, external_dir)
    if not result.blocks:
        raise MatchError("0 attention blocks found; nothing to score")
    blocks = result.blocks
    if method == "weights":
        graph = to_graph(model)
        if external_dir is not None:
            attach_external(graph, external_dir)
        scores = {b.index: weight_importance(b, graph) for b in blocks}
    else:
        scores = _calibrator(model, blocks, calib, external_dir).importance(method)
    scored = onnx.ModelProto()
    scored.CopyFrom(model)
    store_importance(scored, blocks, scores, method)
    return scored, blocks, scores
