"""The pipeline: load -> match -> score -> plan -> rewrite -> verify. ``prune_model`` is the library entry."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .model import inline
from . import pipeline, quant, speed
from .block import AttentionBlock, MatchResult, Miss
from .errors import OnnxPruneError, PlanError
from .model.load import as_model
from .model.proto import name_nodes
from .model.graph import to_graph
from .match import NO_ATTENTION, has_attention, match_graph
from .options import PruneOptions, tolerance
from .probe import probe
from .verify import masked_model, masked_weights, reference


@dataclass(frozen=True)
class PruneResult:
    """What a prune run gives: the pruned model and everything the report says about it."""

    model: onnx.ModelProto
    blocks: tuple[AttentionBlock, ...]
    kept: dict[int, tuple[int, ...]]
    min_heads_applied: dict[int, bool]
    importance: dict[int, np.ndarray]
    params_before: int
    params_after: int
    max_error: float | None = None
    proof_segment_bytes: int | None = None   # the proof ran its models in segments of this many weight bytes
    proof_run: str | None = None             # how the proof ran: whole, segments or blocks (``pipeline.prove``)
    proof_note: str | None = None            # why it did not run block by block where that was asked
    misses: tuple = field(default_factory=tuple)
    gqa: str = "uniform"          # how grouped-query blocks were planned: uniform or group
    io_keep: dict = field(default_factory=dict)   # graph inputs/outputs that lost heads: {name: {axis: kept}}
    kv_cache: bool = False        # the model takes and returns a KV cache (its head dimension changed)
    importance_source: str = "weights"   # where the scores came from (see importance.choose)
    compensate: str | None = None        # auto, bias, scale or refit: the output projections were recovered
    fits: tuple = ()                     # with auto: each block's choice and held-out error (BlockFit)
    gates: int = 0                       # head gates folded into the output projections
    multiple_of: int | None = None       # kept heads x head size rounded up to a multiple of this
    macs: tuple | None = None            # (MacCount before, MacCount after), from ``count_result_macs``
    macs_note: str | None = None         # why the MACs could not be counted
    options: PruneOptions | None = field(default=None, repr=False)   # what the run was asked
    reference: onnx.ModelProto | None = field(default=None, repr=False)   # with gates folded or compensation:
    # the transformed original, whose masked form the pruned model equals (None: the original as given)
    feeds: dict | None = field(default=None, repr=False)   # inputs the run was checked on, where synthetic
    # ones could not drive the model (a few calibration samples); None: synthetic
    quantized: str | None = None         # the quantized forms of its weights (quant/), cut as they are
    plans: dict = field(default_factory=dict, repr=False)   # block index -> plan.BlockPlan (with maps inside)
    dim_fits: tuple = ()                 # cuts inside the heads: each block's circuit, rank, held-out error
    dims_source: str | None = None       # what they were fitted from (calibration or weights)
    budget: object = None                # --attention-ratio: the budget's plan (``budget.BudgetPlan``)


def count_result_macs(model: onnx.ModelProto, result: PruneResult, batch: int = 1, seq: int = 128,
                      external_dir: str | os.PathLike | None = None, shrink: bool = False) -> PruneResult:
    """``result`` with the MACs of ``model`` and of ``result.model`` at ``batch`` x ``seq`` in ``macs`` (per
    block and in total). If the model cannot run at that size (a short position table), ``macs_note`` says
    why; with ``shrink``, half the length is tried first, down to 8."""
    from .macs import block_nodes, count_macs
    model, external_dir = as_model(model, external_dir)
    if not isinstance(result, PruneResult):
        raise TypeError(f"result must be the PruneResult of prune_model, not {type(result).__name__}")
    model = name_nodes(model)
    names = block_nodes(model, result.blocks)
    first_error, length = None, seq
    while True:
        try:
            before = count_macs(model, result.blocks, batch, length, external_dir, names)
            after = before if result.model is model else \
                count_macs(result.model, result.blocks, batch, length, external_dir, names)
            note = None if first_error is None else f"the model does not run at seq {seq}; MACs counted at seq {length}"
            return replace(result, macs=(before, after), macs_note=note)
        except OnnxPruneError as exc:
            first_error = first_error or str(exc).split("inputs: ")[-1]
            if not shrink or length // 2 < 8:
                return replace(result, macs_note=f"MACs not counted: the model does not run at batch {batch}, "
                                                 f"seq {seq} ({first_error})")
            length //= 2


count_params = pipeline.count_params


def inspect_model(model: onnx.ModelProto, external_dir: str | os.PathLike | None = None,
                  feeds: dict | None = None) -> MatchResult:
    """The attention blocks of ``model`` and the explained misses (``model`` and ``external_dir`` as in
    prune_model). ``feeds``: the inputs the probe runs on (synthetic ones where None), for a model that only real
    data runs."""
    model, external_dir = as_model(model, external_dir)
    model, qv = quant.float_view(name_nodes(model), external_dir)    # a quantized model: its float view
    graph = to_graph(model)
    if not has_attention(graph):        # nothing to probe for
        return MatchResult((), (Miss("", "", NO_ATTENTION),))
    shapes, values = probe(model, feeds, external_dir=external_dir, view=qv is not None)
    return match_graph(graph, shapes, values, model)


def prune_model(model, ratio=None, *, kept: dict[int, list[int]] | None = None,
                heads_to_prune: dict[int, list[int]] | None = None, min_heads: int = 1,
                importance: dict[int, np.ndarray] | str | None = None, verify: bool = True,
                feeds: dict | None = None, gqa: str | None = None, scope: str = "layer",
                threshold: float | None = None, calib: dict[str, np.ndarray] | None = None,
                compensate: str | None = None, importance_initializer: str | None = None,
                external_dir: str | os.PathLike | None = None, multiple_of: int | None = None,
                atol: float | None = None, qk_dims=None, v_dims=None, attention_ratio=None,
                target=None, proof: str = "auto", provider: str = "cpu",
                options: PruneOptions | None = None) -> PruneResult:
    """Prune ``model``: an ``onnx.ModelProto``, a path to an .onnx file (loaded and checked; external data
    stays on disk and is read from beside it) or the bytes of a model; anything else raises
    ``ModelTypeError`` (an ``InputError`` and a ``TypeError``).

    The keywords are those of ``PruneOptions`` (see ``options.py``), or pass ``options=`` itself. Give one
    of ``ratio`` (with optional ``importance``), ``threshold``, ``kept`` ({block: heads to keep}) or
    ``heads_to_prune`` ({block: heads to remove}, Hugging Face style); blocks not named keep every head.

    The pruned model is proved equal to the original with the dropped heads masked: a difference beyond
    ``atol`` (1e-4; 1e-2 for fp16 weights), or a NaN, raises ``VerifyError``; ``verify=False`` skips the
    check. Every error raised on purpose is an ``OnnxPruneError`` (``errors.py``), one line of text.

    ``external_dir``: the folder of the data files of a model loaded with ``load_external_data=False``.
    Only the attention weights are then read into memory; every other tensor stays a reference to the
    original data file (``model.save.save_model_atomic`` copies those bytes by streaming)."""
    if options is None:
        options = PruneOptions(ratio=ratio, threshold=threshold, kept=kept, heads_to_prune=heads_to_prune,
                               min_heads=min_heads, scope=scope, importance=importance,
                               importance_initializer=importance_initializer, calib=calib, compensate=compensate,
                               gqa=gqa, multiple_of=multiple_of, verify=verify, atol=atol, feeds=feeds,
                               external_dir=external_dir, qk_dims=qk_dims, v_dims=v_dims,
                               attention_ratio=attention_ratio, target=target, proof=proof, provider=provider)
    model, external_dir = as_model(model, options.external_dir)
    if external_dir != options.external_dir:
        options = replace(options, external_dir=external_dir)
    if options.target is not None and options.latency is None:
        options = replace(options, latency=measure_latency(model, options))
    state = pipeline.run_stages(pipeline.STAGES, pipeline.start(model, options), options)
    return result_of(state, options)


def measure_latency(model: onnx.ModelProto, options: PruneOptions, progress: bool = True):
    """The ``budget.LatencyModel`` of ``model`` for ``options.target`` (``speed.measure``): its blocks matched,
    a few uniformly cut variants timed beside it on the target's provider."""
    t = options.target
    matched = pipeline.run_stages(pipeline.STAGES[:1], pipeline.start(model, options), options)
    return speed.measure(model, matched.model, options, list(matched.blocks), t.provider, t.batch, t.seq, t.context,
                         progress=progress)


def result_of(state: pipeline.State, options: PruneOptions) -> PruneResult:
    """The ``PruneResult`` of a finished run: the one place that reads the final state."""
    return PruneResult(state.pruned, state.blocks, state.kept, {i: p.min_heads_applied for i, p in state.plans.items()},
                       state.scores, pipeline.count_params(state.original), pipeline.count_params(state.pruned),
                       max_error=state.max_error, proof_segment_bytes=state.proof_segment_bytes,
                       proof_run=state.proof_run, proof_note=state.proof_note,
                       misses=state.matched.misses, gqa=state.gqa,
                       io_keep=state.io_keep, kv_cache=state.kv_cache,
                       importance_source=state.source if options.selects_by_score else "given",
                       compensate=state.compensated, fits=state.fits, gates=state.gates, multiple_of=options.multiple_of,
                       options=options, feeds=state.feeds,
                       reference=state.model if (state.gates or state.compensated) else None,
                       quantized=state.quant.describe() if state.quant is not None else None,
                       plans=dict(state.plans), dim_fits=state.dim_fits, dims_source=state.dims_source,
                       budget=state.budget)


def verify_saved(model: onnx.ModelProto, result: PruneResult, path: str | os.PathLike,
                 external_dir: str | os.PathLike | None = None, feeds: dict | None = None,
                 atol: float | None = None) -> PruneResult:
    """Pruning equals masking, checked on the pruned model as written at ``path`` (with its data file beside
    it) rather than in memory: for a large model, neither model's weights are then held by Python while
    ONNX Runtime runs the other. Raises ``VerifyError`` beyond ``atol`` (as ``prune_model``); returns
    ``result`` with its ``max_error``."""
    pipeline.release_memory()
    if result.reference is not None:      # compensated or gates folded: that model, masked, is the reference
        model = result.reference
    model = name_nodes(model)
    # a large file that holds its weights is read as a skeleton of itself: ONNX Runtime reads the weights
    pruned = inline.skeleton(path) if os.path.getsize(path) >= inline.SKELETON_FROM else None
    if pruned is None:
        pruned = onnx.load(str(path), load_external_data=False)
    view, qv = quant.float_view(model, external_dir)
    scaled = any(p.dims for p in result.plans.values())
    if scaled:      # cut inside the heads: the projected original
        overrides, masked, model = None, reference(view, list(result.blocks), result.plans, qv, external_dir), view
    elif qv is not None:     # its float view drives the synthetic inputs (a KV cache's head size)
        overrides, masked, model = None, quant.masked(qv, view, list(result.blocks), result.kept), view
    else:
        overrides = masked_weights(model, list(result.blocks), result.kept, external_dir)
        masked = model if overrides is not None else masked_model(model, list(result.blocks), result.kept,
                                                                  external_dir)
    if atol is None and result.options is not None:
        atol = result.options.atol
    feeds = feeds if feeds is not None else result.feeds     # the run's own inputs, where it needed them
    error, run, segment_bytes, note = pipeline.prove(
        masked, pruned, model, feeds, result.io_keep, external_dir, tolerance(atol, pipeline.is_fp16(model)),
        result.blocks, result.options.proof if result.options is not None else "auto", local=not scaled and qv is None,
        pruned_dir=os.path.dirname(path), overrides=overrides, scaled=pipeline.relative_proof(model, result.plans),
        providers=result.options.providers(exact=True) if result.options is not None else None)
    return replace(result, max_error=error, proof_segment_bytes=segment_bytes, proof_run=run, proof_note=note)


def score_model(model, method: str = "weights", *, calib: dict | None = None,
                external_dir: str | os.PathLike | None = None
                ) -> tuple[onnx.ModelProto, tuple[AttentionBlock, ...], dict[int, np.ndarray]]:
    """Score every head by ``method`` (a source of ``importance.SOURCES`` that computes scores) and return
    (a copy of ``model`` with the scores stored as importance initializers, the blocks, the scores). Pruning
    the copy later uses them with no data."""
    from .importance import NAMED
    from .importance.initializers import store_importance
    model, external_dir = as_model(model, external_dir)
    methods = [m for m in NAMED if m not in ("initializers", "gates")]
    if method not in methods:
        raise PlanError(f"unknown scoring method {method!r}; use one of {', '.join(methods)}")
    options = PruneOptions(ratio=0, importance=method, calib=calib, external_dir=external_dir, verify=False)
    state = pipeline.run_stages(pipeline.STAGES[:1] + (pipeline.Stage("score", pipeline.score, PlanError),),
                                pipeline.start(model, options), options)
    scored = onnx.ModelProto()
    scored.CopyFrom(model)
    store_importance(scored, state.blocks, state.scores, method)
    return scored, state.blocks, state.scores
