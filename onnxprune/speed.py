"""What a cut saves in time on one provider: the latency model that ``--target-speedup`` plans with.

MACs are a poor guide to time: a cut inside the heads keeps the softmax over ``[B, H, S, T]`` and the mask work,
which cost no MACs (on MiniLM at batch 4, length 256, on CPU: half the attention MACs through dims realised half
of the ideal gain, whole heads all of it), small widths run below their MACs, and a decode step is bound by the
bytes it reads. So the time is measured, once per run, on the provider the model will run on, as Kwon et al.
(2022) and ZipLM time their candidate layers: the original and a few variants of it, every block cut alike
(half its heads; half of every head's QK rank; half of its OV rank; a quarter of its heads; with grouped KV heads,
half its KV groups), each written by the same pipeline (maps from the weights: the time does not depend on them),
each timed side by side with the original (interleaved, as ``bench`` does). The time each variant saves is fitted,
by least squares with no negative cost, to what it stops computing (``budget.LatencyModel.features``): projection
MACs, score and context MACs, softmax entries, KV-cache entries. The planner then predicts any mix of heads and
ranks per block from those costs; ``bench`` confirms the result.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from . import pipeline
from .bench import Runner, decode_inputs, inputs_for, make_session, quartiles, timed
from .budget import FEATURES, LatencyModel, widths_of
from .errors import InputError, OnnxPruneError, PlanError
from .model.save import save_model_atomic
from .options import PruneOptions
from .progress import Progress

RUNS = 12        # timed runs of each variant and of the original beside it


def variants(blocks) -> dict[str, dict]:
    """name -> {block index: (kept heads, ranks)}: the uniform cuts that the costs are fitted to. A variant that
    no block can take (a quarter of one head) is left out."""
    out: dict[str, dict] = {}

    def heads(b, keep: float, whole_groups: bool = False) -> tuple:
        per = b.num_heads // b.num_kv_heads
        if whole_groups:            # the first half of the KV groups, each with all its query heads
            return tuple(h for g in b.kv_groups[:max(1, int(b.num_kv_heads * keep))] for h in g)
        if b.num_kv_heads not in (1, b.num_heads):      # the same count in every group
            return tuple(h for g in b.kv_groups for h in g[:max(1, int(per * keep))])
        return tuple(range(max(1, int(b.num_heads * keep))))

    def ranks(b, share: float, circuits) -> dict:
        step = b.rank_multiple() or 1
        r = max(step, int(b.head_dim * share) // step * step)
        return {c: r for c in ("qk", "ov") if c in circuits or b.one_head_size}

    out["heads/2"] = {b.index: (heads(b, 0.5), {}) for b in blocks}
    out["heads/4"] = {b.index: (heads(b, 0.75), {}) for b in blocks}
    if any(b.num_kv_heads not in (1, b.num_heads) for b in blocks):
        out["groups/2"] = {b.index: (heads(b, 0.5, True), {}) for b in blocks}
    every = lambda b: tuple(range(b.num_heads))   # noqa: E731
    out["qk/2"] = {b.index: (every(b), ranks(b, 0.5, ("qk",))) for b in blocks}
    if not any(b.one_head_size for b in blocks):
        out["ov/2"] = {b.index: (every(b), ranks(b, 0.5, ("ov",))) for b in blocks}
    return {name: plan for name, plan in out.items()
            if any(len(k) < b.num_heads or r for b in blocks for k, r in [plan[b.index]])}


def _variant(model: onnx.ModelProto, options: PruneOptions, plan: dict, blocks) -> onnx.ModelProto:
    """``model`` cut to ``plan`` by the pipeline, unverified (the maps from the weights alone)."""
    kept = {i: list(k) for i, (k, _) in plan.items()}
    ranks = next((r for _, r in plan.values() if r), {})
    d = blocks[0].head_dim
    share = {c: 1 - ranks[c] / d for c in ranks}
    opts = PruneOptions(kept=kept, verify=False, external_dir=options.external_dir, gqa=options.gqa,
                        qk_dims=share.get("qk"), v_dims=share.get("ov"), multiple_of=None)
    state = pipeline.run_stages(pipeline.STAGES[:-1], pipeline.start(model, opts), opts)
    return state.pruned


def measure(model: onnx.ModelProto, view: onnx.ModelProto, options: PruneOptions, blocks, provider: str = "cpu",
            batch: int = 1, seq: int = 128, context: int | None = None, runs: int = RUNS,
            threads: int | None = None, progress: bool = True) -> LatencyModel:
    """The ``LatencyModel`` of ``model`` (matched into ``blocks`` on ``view``, a quantized model's float view, else
    the model) on ``provider``: at ``batch`` x ``seq`` from an empty cache, or, with ``context``, for a decode step
    against ``context`` cached tokens (see the module docstring). The variants are written into a temporary
    folder, one at a time, and each is timed beside the one session of the original."""
    plans = variants(blocks)
    if not plans:
        raise PlanError("no block can be cut in half to measure what a cut saves")
    width = {b.index: widths_of(view, b) for b in blocks}
    phase = "forward" if context is None else "decode"
    base = LatencyModel(provider, phase, batch, 1 if context else seq, (context + 1) if context else seq, 0.0,
                        tuple(0.0 for _ in FEATURES))

    def units(plan) -> np.ndarray:
        return sum(base.features(b, width[b.index], len(plan[b.index][0]), len(b.kept_kv_heads(plan[b.index][0])),
                                 plan[b.index][1]) for b in blocks)

    whole = {b.index: (tuple(range(b.num_heads)), {}) for b in blocks}
    rows, saved, names, times0 = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="onnxprune-speed-") as tmp, \
            Progress(len(plans) * runs, f"timing cut variants on {provider}", unit="runs",
                     min_total=1 if progress else 10 ** 9) as bar:
        original = Path(tmp) / "original.onnx"
        _write(model, original, options)
        first = _runner(original, provider, threads, batch, seq, context)
        for name, plan in plans.items():
            try:
                cut = _variant(model, options, plan, blocks)
            except OnnxPruneError:          # a variant this model cannot take (a rotation of a quantized weight)
                continue
            path = Path(tmp) / "variant.onnx"
            _write(cut, path, options)
            t_orig, t_cut = _time_pair(first, _runner(path, provider, threads, batch, seq, context), provider,
                                       runs, bar)
            rows.append(units(whole) - units(plan))
            saved.append(t_orig - t_cut)
            names.append((name, t_cut))
            times0.append(t_orig)
            del cut
    if not rows:
        raise PlanError("none of the cut variants could be written to measure what a cut saves")
    coef = nonnegative_fit(np.array(rows), np.array(saved))
    base_ms = float(np.median(times0))
    points = tuple((name, float(t), float(base_ms - np.dot(coef, row))) for (name, t), row in zip(names, rows))
    return replace(base, base_ms=base_ms, coef=tuple(float(c) for c in coef), points=points)


def _write(model: onnx.ModelProto, path: Path, options: PruneOptions):
    """``model`` written to ``path``; a copy is written, since writing points a model's tensors at the new
    data file (``model.save.stage_model``), and ``model`` is read again for the next variant."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    big = copy.ByteSize() > (1 << 30) if not options.external_dir else True
    save_model_atomic(copy, path, external=big, external_dir=options.external_dir)


def _runner(path: Path, provider, threads, batch, seq, context) -> Runner:
    """A session of the model at ``path`` on its inputs: a decode step at ``context``, else a forward pass."""
    from .model.load import load_model
    graph = load_model(path, external_data=False)
    try:
        feeds = decode_inputs(graph, batch, context) if context else inputs_for(graph, batch, seq, None)
        return Runner(make_session(path, provider, threads), feeds, provider != "cpu")
    except InputError:
        raise
    except Exception as exc:        # onnxruntime's own types
        from .runtime import ort_reason
        raise InputError(f"the speed target's variants do not run on {provider}: {ort_reason(exc)}") from None


def _time_pair(original: Runner, variant: Runner, provider, runs, bar) -> tuple[float, float]:
    """Median ms of ``original`` and ``variant``, timed interleaved (ABBA) in this process."""
    try:
        times = timed([original, variant], 2, runs, bar)
    except Exception as exc:        # onnxruntime's own types
        from .runtime import ort_reason
        raise InputError(f"the speed target's variants do not run on {provider}: {ort_reason(exc)}") from None
    return quartiles(times[0])[0], quartiles(times[1])[0]


def nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares ``x c ≈ y`` with ``c >= 0``: features whose cost comes out negative (noise, or a feature
    that no variant separates from another) are dropped and the rest refitted. numpy has no NNLS and scipy is
    not a dependency for these few lines."""
    active = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    coef = np.zeros(x.shape[1])
    while active:
        scale = np.abs(x[:, active]).max(axis=0)
        c, *_ = np.linalg.lstsq(x[:, active] / scale, y, rcond=None)
        c = c / scale
        if np.all(c >= 0):
            coef[active] = c
            break
        active.pop(int(np.argmin(c * scale)))
    return coef
