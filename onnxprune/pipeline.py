"""The prune pipeline: a list of stages, each ``(state, options) -> state``, over a frozen ``State``.

    match -> fold gates -> score -> plan -> fit dims -> compensate -> rewrite -> verify

A stage that makes a new model (gate folding, compensation) matches its blocks again itself: there is no
recursion. Each stage names the typed error that a stray exception inside it becomes, so that every
failure is one line that says where it happened. ``verify`` raises ``VerifyError`` when the pruned model
differs from the masked original by more than the tolerance; ``PruneOptions(verify=False)`` opts out.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from . import blockproof
from . import plan as planning
from . import rewrite as rewriting
from .block import AttentionBlock, MatchResult
from .blockproof import Unavailable
from .calibration.session import open_session
from .budget import plan_budget
from .calibration.sites import broadcast_key, projection_input, projection_output
from .cut import project_heads, qk_passes, written
from .errors import InputError, MatchError, OnnxPruneError, PlanError, RewriteError, VerifyError
from .importance import SOURCES, ImportanceContext, choose, scores_for
from .importance.initializers import (IMPORTANCE_SUFFIX, IMPORTANCE_TABLE, carry_importance, initializer_importance,
                                      stored_method)
from .inputs import first_samples, synth_inputs
from .match import NO_ATTENTION, has_attention, match_graph
from .model.dtypes import FLOAT_TYPES
from .model.graph import attach_external, to_graph
from .model.proto import name_nodes
from .options import PruneOptions
from .probe import probe
from .quant import float_view, quantized_sizes, refold
from .segments import budget_for
from .transforms.compensate import compensation, with_weights
from .transforms.gates import find_gates, fold_gates as fold
from .transforms.subspace import Moments
from .verify import compare, difference, kept_heads_only, reference, worst_of


@dataclass(frozen=True)
class State:
    original: onnx.ModelProto                 # the model as given: never changed
    model: onnx.ModelProto                    # the model now pruned (gates folded, compensation written in)
    feeds: dict | None = field(repr=False)    # the inputs that probe and verification run on (None: synthetic)
    graph: object = field(default=None, repr=False)    # onnx_graphsurgeon graph of ``model``
    shapes: dict = field(default_factory=dict, repr=False)
    values: dict = field(default_factory=dict, repr=False)
    matched: MatchResult | None = None
    gqa: str = "uniform"
    kv_cache: bool = False
    gates: int = 0                            # head gates folded
    gate_scores: dict | None = None
    scores: dict = field(default_factory=dict)
    source: str = "given"
    calibration: object = field(default=None, repr=False)
    plans: dict = field(default_factory=dict)     # block index -> plan.BlockPlan
    compensated: str | None = None
    fits: tuple = ()                          # what --compensate auto chose per block (transforms.compensate)
    pruned: onnx.ModelProto | None = None
    io_keep: dict = field(default_factory=dict)
    max_error: float | None = None
    proof_segment_bytes: int | None = None    # the proof ran its models in segments of this many weight bytes
    proof_run: str | None = None              # how the proof ran: whole, segments or blocks
    proof_note: str | None = None             # why it did not run as asked (block by block not possible)
    quant: object = field(default=None, repr=False)   # quant.QuantView of a quantized model (``model`` is its view)
    dim_fits: tuple = ()                      # the cuts inside the heads (``DimFit``), block by block
    dims_source: str | None = None            # what they were fitted from: calibration or weights
    budget: object = None                     # the attention budget's plan (``budget.BudgetPlan``)

    @property
    def blocks(self) -> tuple[AttentionBlock, ...]:
        return self.matched.blocks if self.matched is not None else ()

    @property
    def kept(self) -> dict[int, tuple[int, ...]]:
        """The heads each block keeps."""
        return {i: p.kept_heads for i, p in self.plans.items()}

    @property
    def changes(self) -> bool:
        return any(self.plans[b.index].kept_heads != tuple(range(b.num_heads)) or self.plans[b.index].dims
                   for b in self.blocks)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[State, PruneOptions], State]
    error: type = OnnxPruneError          # what a stray exception in this stage becomes


def run_stages(stages, state: State, options: PruneOptions) -> State:
    for stage in stages:
        try:
            state = stage.run(state, options)
        except OnnxPruneError:
            raise
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:        # a bug or an unforeseen input: one line, naming the stage
            raise stage.error(f"{stage.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                              if str(exc) else f"{stage.name} failed: {type(exc).__name__}") from exc
    return state


# ------------------------------------------------------------------ stages
def match(state: State, options: PruneOptions) -> State:
    """Probe ``state.model`` on ONNX Runtime and match its attention blocks."""
    model = state.model
    graph = to_graph(model)
    if not has_attention(graph):        # said before inputs are made up and run for nothing
        raise MatchError(f"0 attention blocks found ({NO_ATTENTION})")
    try:
        shapes, values = probe(model, state.feeds, options.external_dir, view=state.quant is not None)
    except InputError:
        if state.feeds is not None or options.calib is None:
            raise
        # the user's data drives the probe where synthetic inputs do not run (sizes only data can tell)
        state = replace(state, feeds=first_samples(model, options.calib))
        shapes, values = probe(model, state.feeds, options.external_dir, view=state.quant is not None)
    if options.external_dir is not None:
        release_memory()     # the probe's run is over: hand its heap back before the weights are read
    matched = match_graph(graph, shapes, values, model)
    if not matched.blocks:
        detail = "; ".join(m.describe() for m in matched.misses[:3])
        raise MatchError(f"0 attention blocks found ({detail})")
    if options.external_dir is not None:
        attach_external(graph, options.external_dir)
    if state.quant is not None:      # the blocks' quantized weights, dequantized: scores and slices read them
        tensors = graph.tensors()
        names = {t.name for b in matched.blocks for t in b.tensors if t.constant}
        for name, value in state.quant.materialize(model, names).items():
            tensors[name].values = value
    kv_cache = any(t.io for b in matched.blocks for t in b.tensors)
    if options.gqa is not None:
        gqa = options.gqa
    elif state.matched is not None:          # matched again after a transform: keep the first choice
        gqa = state.gqa
    else:                                     # a KV cache shrinks only when whole KV groups go
        gqa = "group" if kv_cache else "uniform"
    return replace(state, graph=graph, shapes=shapes, values=values, matched=matched, kv_cache=kv_cache, gqa=gqa)


def fold_gates(state: State, options: PruneOptions) -> State:
    """Head gates are folded into the output projections (outputs unchanged); their values are kept as a
    source of importance. The folded model is matched again."""
    gates = find_gates(state.model, state.blocks)
    if not gates:
        return state
    if state.quant is not None:
        raise PlanError(f"the model has head gates ({len(gates)}), and folding them into its {state.quant.describe()} "
                        "output projections would re-quantize them; fold or prune the float model, then quantize it")
    by_block = {}
    for g in gates:
        by_block[g.block] = by_block.get(g.block, 1.0) * np.abs(np.asarray(g.values))
    folded = replace(state, model=fold(state.model, state.blocks, gates), gates=len(gates), gate_scores=by_block)
    return match(folded, options)


def score(state: State, options: PruneOptions) -> State:
    """Importance per head, from the source chosen by ``importance.choose`` (only a ratio or a threshold
    needs scores)."""
    if not options.selects_by_score:
        return state
    if options.cuts_dims and options.ratio is not None and planning.exact_ratio(options.ratio) == 0 \
            and options.multiple_of is None:
        return state           # dims alone: every head stays, nothing to rank
    has_stored = options.importance is None and initializer_importance(
        state.model, state.blocks, options.importance_initializer) is not None
    source = choose(options, has_stored, bool(state.gate_scores))
    outputs = SOURCES[source].outputs if source in SOURCES else True
    ctx = ImportanceContext(state.model, state.blocks, options, graph=state.graph, gate_scores=state.gate_scores,
                            make_calibration=lambda: calibration(state, options, outputs))
    scores = scores_for(source, ctx)
    if source == "initializers":
        method = stored_method(state.model)
        source = f"initializers ({method})" if method else "initializers"
    return replace(state, scores=scores, source=source, calibration=ctx.session)


def calibration(state: State, options: PruneOptions, outputs: bool = True):
    """The shared calibration session on ``state.model`` (``calibration.session.open_session``)."""
    if state.quant is not None:      # calibration runs the whole float view: every weight dequantized
        state.quant.materialize(state.model)
    return open_session(state.model, state.blocks, state.shapes, options.calib, options.external_dir, outputs,
                        run=options.proof, providers=options.providers())


def make_plan(state: State, options: PruneOptions) -> State:
    """What every block keeps (``plan.plan_blocks``)."""
    return replace(state, plans=planning.plan_blocks(state.blocks, state.scores, state.graph, options, state.gqa))


def fit_dims(state: State, options: PruneOptions) -> State:
    """Maps inside the kept heads (``--qk-dims``, ``--v-dims``), fitted per block from calibration moments, or
    from the weights alone without data (``transforms.subspace``), into each block's plan."""
    if not options.cuts_dims:
        return state
    refuse_requantizing(state, wanted_circuits(state, options))      # before any calibration runs
    budget = options.budget
    shares = {"qk": options.qk_dims, "ov": options.v_dims}
    wanted = {c: None if budget else shares[c] for c in wanted_circuits(state, options)}
    for b in state.blocks:          # what the rewrite would refuse, refused before anything is fitted
        rewriting.check_cut(b, tuple(wanted), state.shapes)
    cal = None
    if options.calib is not None:
        taps, fed = (), ()        # QK: the queries and keys to read; the budget: the Q weights it rewrites
        if "qk" in wanted:
            taps = tuple(n for b in state.blocks for role in ("q", "k")
                         for n in [projection_output(state.model, b, role) or projection_input(state.model, b, role)
                                   or (broadcast_key(state.model, b) if role == "k" else None)]
                         if n is not None)
            if budget:
                fed = tuple(t.name for b in state.blocks for t in written(b, "qk"))
        if state.quant is not None:      # calibration runs the whole float view: every weight dequantized
            state.quant.materialize(state.model)
        cal = open_session(state.model, state.blocks, state.shapes, options.calib, options.external_dir,
                           outputs=budget, taps=taps, fed=fed, run=options.proof, providers=options.providers())
    moments = Moments(state.model, state.blocks, cal, tuple(wanted), options.external_dir,
                      select_ov=state.quant is not None)
    ranks, plans, fits, spent = {}, dict(state.plans), [], None
    if budget:
        sample = next(iter(options.calib.values()))
        seq = sample.shape[1] if sample.ndim > 1 else 128
        if options.target is not None and options.latency is None:
            raise PlanError("a speed target needs its latency model measured first (api.prune_model does it)")
        spent = plan_budget(cal, moments, state.blocks, options.attention_ratio, tuple(wanted),
                            options.multiple_of, seq,
                            compensate=None if state.quant is not None and options.compensate_implied
                            else options.compensate,
                            uniform=options.uniform_blocks, latency=options.latency,
                            target=options.target.speedup if options.target is not None else None)
        for choice in spent.choices:
            ranks.update({(choice.block, c): r for c, r in choice.ranks.items()})
            plans[choice.block] = replace(plans[choice.block], kept_heads=choice.heads)
    for b in state.blocks:
        dims = []
        for name, share in wanted.items():
            rank = ranks[(b.index, name)] if budget else planning.keep_rank(b.head_dim, share,
                                                                            b.rank_multiple(options.multiple_of))
            if name == "ov" and dims and b.one_head_size:      # GroupQueryAttention: V at the QK rank
                rank = dims[0].rank
            if rank >= b.head_dim:
                continue
            fit = moments.fit_circuit(b.index, name, rank)
            dims.append(fit.dims)
            keep = fit.dims.keep
            fits.append(DimFit(b.index, name, fit.dims.rank, fit.error,
                               tuple(int(i) for i in keep) if keep is not None else None))
        plans[b.index] = replace(plans[b.index], dims=tuple(dims))
    return replace(state, plans=plans, dim_fits=tuple(fits), dims_source=moments.source,
                   budget=spent)


def wanted_circuits(state: State, options: PruneOptions) -> tuple:
    """The circuits that ``fit_dims`` cuts: the budget's both where QK can be cut (no q/k norm), else OV only."""
    if options.budget:
        return ("qk", "ov") if all(qk_passes(b) for b in state.blocks) else ("ov",)
    return tuple(c for c, r in (("qk", options.qk_dims), ("ov", options.v_dims)) if r not in (None, 0))


def refuse_requantizing(state: State, circuits=None):
    """A cut inside the heads that rotates weights: a quantized model would have to be quantized again. One that
    keeps positions (QK through a rotary embedding: whole pairs) cuts the quantized weights as heads are cut.
    ``circuits``: those about to be fitted; else the plans' maps."""
    if state.quant is None:
        return
    if circuits is not None:        # OV keeps whole positions there (``subspace.fit_ov_select``)
        rotates = any(c == "qk" and not b.selects_dims for c in circuits for b in state.blocks)
    else:
        rotates = any(d.keep is None for p in state.plans.values() for d in p.dims)
    if rotates:
        raise PlanError(f"a cut inside the heads would re-quantize this {state.quant.describe()} model's weights "
                        "(a rotation of the head size); cut the float model, then quantize it, or keep whole "
                        "positions: --qk-dims through a rotary embedding does, and --v-dims on a quantized model")


@dataclass(frozen=True)
class DimFit:
    """One circuit of one block cut inside its heads: its rank of the head size and the held-out error."""

    block: int
    circuit: str
    rank: int
    error: float
    positions: tuple | None = None      # the head-size positions kept, where the cut keeps positions (rotary)


def compensate(state: State, options: PruneOptions) -> State:
    """Write the recovered output projections into the model, which is then matched again: the pruned
    model is proved equal to the compensated original with the dropped heads masked."""
    if options.compensate in (None, "none") or not state.changes:
        return state
    if state.quant is not None and options.compensate_implied:       # the budget's default: not on integers
        return state
    if state.quant is not None:
        raise PlanError(f"--compensate writes new output-projection weights, which this {state.quant.describe()} "
                        "model would have to re-quantize; compensate the float model, then quantize it")
    dims = {b.index: {d.circuit: d for d in state.plans[b.index].dims} for b in state.blocks
            if state.plans[b.index].dims}
    below = next((b for b in state.blocks if "qk" in dims.get(b.index, {}) and b.qk_below("q")), None)
    if below is not None:
        raise PlanError(f"--compensate after a QK cut below the q/k norms (block {below.index}, {below.name}) is not "
                        "supported yet: its calibration would need the cut written below the norm; cut without "
                        "--compensate, or cut --v-dims only")
    if dims:     # the cut model's Q weights are fed: its QK cuts are written into them
        fed = tuple(t.name for b in state.blocks for d in dims.get(b.index, {}).values() if d.circuit == "qk"
                    for t in written(b, "qk"))
        cal = open_session(state.model, state.blocks, state.shapes, options.calib, options.external_dir,
                           outputs=False, fed=fed, run=options.proof, providers=options.providers())
    else:
        cal = state.calibration or calibration(state, options, outputs=False)
    if cal.shared:
        raise PlanError(f"--compensate: block {min(cal.shared)} shares its output projection with another block "
                        "(the model reuses one layer's weights), and one refit cannot serve both; prune "
                        "without --compensate")
    fits: list = []
    cut = {t.name: project_heads(cal.weights[t.name], b, t, state.plans[b.index].kept_heads, d)
           for b in state.blocks for d in dims.get(b.index, {}).values() for t in written(b, d.circuit)}
    edited = with_weights(state.model, cal, compensation(cal, state.kept, options.compensate, report=fits,
                                                         dims=dims, cut=cut))
    cal.session = None          # its weights, in ONNX Runtime, would sit beside the next probe's: let them go
    release_memory()
    again = match(replace(state, model=edited, graph=None, calibration=None), options)
    if [(b.name, b.num_heads) for b in again.blocks] != [(b.name, b.num_heads) for b in state.blocks]:
        raise RewriteError("the compensated model matches other blocks than the original")
    return replace(again, compensated=options.compensate, fits=tuple(fits))


def rewrite(state: State, options: PruneOptions) -> State:
    """Slice every tensor with a head axis and commit all edits at once; an unchanged plan returns the
    model as it is."""
    if not state.changes:            # the model as given, unless a transform made a new one
        transformed = state.gates or state.compensated
        return replace(state, pruned=state.model if transformed else state.original, graph=None)
    if any(p.dims for p in state.plans.values()):
        refuse_requantizing(state)
    graph = state.graph
    dead = rewriting.dead_nodes(graph)
    rewriter = rewriting.Rewriter(graph, state.shapes, state.values, quantized=state.quant is not None)
    for b in state.blocks:
        rewriter.plan(b, state.plans[b.index].kept_heads, state.plans[b.index].dims)       # every check first ...
    rewriter.commit()                                 # ... then every edit
    with contextlib.chdir(options.external_dir or "."):   # the checker finds external data files from there
        pruned = rewriting.export(graph, state.model, dead)
        if state.quant is not None:       # the float view, pruned: back to the quantized form
            pruned = refold(pruned, state.quant, rewriter.cuts)
        pruned = rewriting.check_model(pruned, state.quant.real if state.quant is not None else state.model)
    carry_importance(state.model, pruned, state.blocks, state.kept)
    io_keep = rewriter.io_keep
    del graph, rewriter, dead        # the sliced weights now live in ``pruned`` only: free the graph's copies
    state = replace(state, pruned=pruned, graph=None, io_keep=io_keep)
    if options.external_dir is not None or pruned.ByteSize() > LARGE:
        release_memory()             # a large model: hand the graph's copies back before verification
    return state


def verify(state: State, options: PruneOptions) -> State:
    """Pruned == masked original on ONNX Runtime CPU; beyond the tolerance, or NaN, is a ``VerifyError``."""
    if not options.verify:
        return state
    masked = reference(state.model, state.blocks, state.plans, state.quant, options.external_dir)
    error, run, segment_bytes, note = prove(
        masked, state.pruned, state.model, state.feeds, state.io_keep, options.external_dir,
        options.tolerance(is_fp16(state.original)), state.blocks, options.proof,
        local=state.quant is None and not any(p.dims for p in state.plans.values()),
        scaled=relative_proof(state.original, state.plans), providers=options.providers(exact=True),
        size_of=state.original)
    return replace(state, max_error=error, proof_segment_bytes=segment_bytes, proof_run=run, proof_note=note)


def proof_mode(model: onnx.ModelProto, mode: str) -> tuple[str, int | None]:
    """How the proof runs (``--proof``): ``whole``; ``segments`` (and the weight bytes of a segment); ``blocks``
    (the segments' bytes too, should it fall back to them). ``auto``: whole where both models fit in memory
    (``segments.budget_for``), else block by block."""
    if mode == "whole":
        return "whole", None
    if mode in ("segments", "blocks"):
        return mode, budget_for(model, "segments")
    budget = budget_for(model, "auto")
    return ("blocks", budget) if budget else ("whole", None)


def prove(masked, pruned, model, feeds, io_keep, external_dir, atol, blocks, mode: str, local: bool = True,
          pruned_dir=None, overrides=None, scaled: bool = False, providers=None, size_of=None
          ) -> tuple[float, str, int | None, str | None]:
    """Prove ``pruned`` equal to ``masked`` as ``mode`` says (``proof_mode``; sized by ``size_of``, the original,
    or ``model``): (the largest difference, how it ran, the segments' weight bytes, why it did not run block by block
    where asked). Block by block (``blockproof``) needs maps that leave the tensors at the blocks' frontier whole
    (``local``: heads removed, no cut inside them, not quantized); else, or where a block cannot be cut out alike
    from both models, the models run in segments. A ``VerifyError`` beyond ``atol`` or on NaN."""
    run, budget = proof_mode(size_of if size_of is not None else model, mode)
    note = None
    if run == "blocks":
        try:
            if not local:
                raise Unavailable("a cut inside the heads or a quantized model: its reference differs at the "
                                  "blocks' edges")
            runs = [(f, kept_heads_only(f, io_keep)) for f in verification_feeds(model, feeds, io_keep)]
            error = blockproof.prove(masked, pruned, blocks, runs,
                                     lambda ref, got, f: difference(ref, got, f, io_keep, scaled), external_dir,
                                     pruned_dir or external_dir, overrides, providers)
            check_error(error, atol)
            return error, "blocks", None, None
        except Unavailable as why:
            run, note = "segments", f"block by block not possible ({why}): both models ran in segments"
    error = prove_equal(masked, pruned, model, feeds, io_keep, external_dir, atol, pruned_dir, overrides, scaled,
                        budget if run == "segments" else None, providers)
    return error, run, budget if run == "segments" else None, note


def relative_proof(model: onnx.ModelProto, plans: dict) -> bool:
    """Whether the proof compares each output relative to its largest magnitude (above 1): where the pruned model
    adds its products in another order than the reference, and the rounding is relative to the values. A cut
    inside the heads multiplies by the projection in another order; fp16 rounds every sum to 11 bits, so an
    output of 30 differs by a unit of its last place, 0.0156, when heads are removed instead of zeroed (a 1.5 GB
    fp16 synthetic decoder failed the absolute 1e-2 so, 2026-12-07)."""
    return is_fp16(model) or any(p.dims for p in plans.values())


def prove_equal(masked, pruned, model, feeds, io_keep, external_dir, atol, pruned_dir=None, overrides=None,
                scaled: bool = False, segment_bytes: int | None = None, providers=None) -> float:
    """The largest difference between the masked original and the pruned model, on ``feeds`` (synthetic
    when None) and, with a KV cache, on a decode step too; a ``VerifyError`` beyond ``atol`` or on NaN.
    ``scaled``: relative to outputs larger than 1 (a projected reference, ``verify.max_abs_diff``);
    ``segment_bytes``: both models run in segments (``segments.budget_for``); ``providers``: where (CPU)."""
    error = worst_of(compare(masked, pruned, f, io_keep, external_dir, pruned_dir=pruned_dir,
                             masked_overrides=overrides, scaled=scaled, segment_bytes=segment_bytes,
                             providers=providers)
                     for f in verification_feeds(model, feeds, io_keep))
    check_error(error, atol)
    return error


STAGES = (Stage("match", match, MatchError), Stage("fold gates", fold_gates, RewriteError),
          Stage("score", score, PlanError), Stage("plan", make_plan, PlanError),
          Stage("fit dims", fit_dims, PlanError), Stage("compensate", compensate, PlanError), Stage("rewrite", rewrite, RewriteError),
          Stage("verify", verify, VerifyError))


# ------------------------------------------------------------------ helpers
def check_error(error: float, atol: float):
    """Raise ``VerifyError`` unless ``error`` is a number within ``atol`` (NaN and inf never are)."""
    if error <= atol:
        return
    if np.isnan(error):
        raise VerifyError("the pruned model or the masked original gives NaN outputs, so they cannot be shown "
                          "equal; nothing written")
    raise VerifyError(f"pruned model differs from the masked original by {error:.3g} (> atol {atol}); "
                      "nothing written")


def is_fp16(model: onnx.ModelProto) -> bool:
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def verification_feeds(model: onnx.ModelProto, feeds: dict | None, io_keep: dict) -> list[dict]:
    runs = [feeds if feeds is not None else synth_inputs(model)]
    if io_keep:            # a KV cache: also a decode step on a non-empty past
        runs.append(synth_inputs(model, seed=1, batch=1, seq=1, past=3))
    return runs


LARGE = 256 << 20      # bytes of a model above which freed memory is handed back before the next step


def release_memory():
    """Collect, and hand freed heap back to the system (glibc keeps it otherwise), before ONNX Runtime loads
    a large model's weights for verification."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def count_params(model: onnx.ModelProto) -> int:
    """Weights: floating-point elements in initializers and Constant nodes, and the quantized weights that
    dequantize to floats (the data of DequantizeLinear and MatMulInteger, K x N of MatMulNBits, not their
    scales); integer shape and index constants are not parameters, and stored importance scores are not
    weights."""
    data, scales = quantized_sizes(model)

    def size(t: onnx.TensorProto) -> int:
        return int(np.prod(t.dims)) if t.data_type in FLOAT_TYPES else 0

    total = sum(size(t) for t in model.graph.initializer
                if not (t.name.endswith(IMPORTANCE_SUFFIX) or t.name == IMPORTANCE_TABLE or
                        t.name in scales))
    total += sum(data.values())
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(size(a.t) for a in node.attribute if a.name == "value")
    return total


def start(model: onnx.ModelProto, options: PruneOptions) -> State:
    """The first state: every node of the model named (a named copy when some are not: the caller's model
    is not changed), and the probe's inputs."""
    named = name_nodes(model)
    # None: synthetic, made by the probe and by verification (and said so in their errors)
    feeds = dict(options.feeds) if options.feeds is not None else None
    view, qv = float_view(named, options.external_dir)    # a quantized model: planned on its float view
    return State(original=model, model=view, feeds=feeds, quant=qv)
