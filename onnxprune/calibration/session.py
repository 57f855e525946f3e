"""The one instrumented ONNX Runtime session that the calibrated importance methods (``importance/activation.py``,
``ablation.py``, ``mean_ablation.py``, ``residual.py``) and compensation (``transforms/compensate.py``) share.

The output-projection weights and biases become graph inputs of a working copy, so that a head is masked,
or a block's projection refitted, by feeding other arrays, never by building a model per head. The context
that each output projection reads (the concatenated heads) is captured by adding it as a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import InputError, PlanError
from ..inputs import fixed_sizes, synth_inputs
from ..model.proto import own_weights
from ..progress import Progress
from ..runtime import ort_reason, session
from ..segments import Segmented, budget_for, run_segmented
from .data import BATCH, batches
from .sites import ProjectionSite, add_bias, find_sites, head_columns, own_initializer, private_copy

class Calibrator:
    """Runs ``model`` on calibration batches with the output projections as inputs. ``outputs=False``: the
    heads' contexts only (what activation scores and compensation read), never the model's outputs."""

    def __init__(self, model: onnx.ModelProto, blocks, data: list[dict[str, np.ndarray]], external_dir=None,
                 progress: bool = True, outputs: bool = True, taps: tuple = (), fed: tuple = (),
                 segment_bytes: int | None = None, providers=None):
        self.model = model
        self.providers = providers              # ONNX Runtime's providers (CPU by default; ``--provider``)
        self.external_dir = external_dir
        self.segment_bytes = segment_bytes      # run in segments of this many weight bytes (``segments.py``)
        self.blocks = list(blocks)
        self.data = data
        self.progress = progress
        work = onnx.ModelProto()
        work.CopyFrom(model)
        own_weights(work, [b.o_proj.weight for b in self.blocks])   # shared through Identity: a copy each
        self.sites = find_sites(work, self.blocks)
        self.weights: dict[str, np.ndarray] = {}
        self.shared = set()         # blocks whose output projection another block reads too (ALBERT)
        for s in self.sites:
            if s.bias is None:
                s.bias = add_bias(work, s)
            for name in (s.weight, s.bias):
                if name in self.weights:        # shared by blocks: this block reads a copy of its own here
                    self.shared.add(s.block.index)
                    name = private_copy(work, s, name, self.weights[name])
                self._feed(work, name, external_dir)
        fed = [n for n in fed if n not in self.weights]   # more weights as inputs (the Q that a QK cut rewrites)
        if fed:
            own_weights(work, fed)
        for name in fed:
            self._feed(work, name, external_dir)
        if not outputs:       # contexts only: ONNX Runtime drops what only the outputs needed
            del work.graph.output[:]
        # the loss judges what the model says, not the KV cache it hands on (a sliding-window cache's unwritten
        # entries hold whatever memory held)
        caches = {t.name for b in blocks for t in b.tensors if t.io}
        self.outputs = [o.name for o in work.graph.output if o.name not in caches] or \
            [o.name for o in work.graph.output]
        known = {o.name for o in work.graph.output}
        for name in [s.context for s in self.sites] + list(taps):     # taps: more tensors to read (grams)
            if name not in known:
                work.graph.output.append(helper.make_empty_tensor_value_info(name))
                known.add(name)
        self.taps = tuple(taps)
        self.work = work
        # graph optimizations on: calibration reads statistics, not an exact proof, and runs many times; a model
        # bigger than the memory runs in segments, each segment's session made once per pass over the batches
        # (``run_each``, ``walk``), or once per batch by ``run``
        self.session = None if segment_bytes else session(work, external_dir=external_dir, optimize=True,
                                                          providers=providers)
        self.mask_input = next((i.name for i in model.graph.input if "attention_mask" in i.name
                                and len(i.type.tensor_type.shape.dim) == 2), None)

    def _feed(self, work: onnx.ModelProto, name: str, external_dir):
        """Make weight ``name`` of ``work`` a graph input, its value kept in ``weights``."""
        proto = own_initializer(work, name)
        self.weights[name] = numpy_helper.to_array(proto, base_dir=str(external_dir or ""))
        work.graph.initializer.remove(proto)
        work.graph.input.append(helper.make_tensor_value_info(name, proto.data_type, list(proto.dims)))

    # ------------------------------------------------------------------ running
    def _names(self, contexts: bool) -> list[str]:
        return list(dict.fromkeys(self.outputs + ([s.context for s in self.sites] + list(self.taps)
                                                   if contexts else [])))

    def run(self, feeds: dict, weights: dict | None = None, contexts: bool = False):
        names = self._names(contexts)
        values = {**feeds, **self.weights, **(weights or {})}
        try:
            if self.segment_bytes:
                return run_segmented(self.work, values, self.external_dir, budget=self.segment_bytes, outputs=names,
                                     optimize=True, providers=self.providers)
            got = self.session.run(names, values)
        except Exception as exc:   # onnxruntime's own types: token ids out of range, wrong sizes
            raise InputError(f"onnxruntime could not run the model on the calibration data: {ort_reason(exc)}") \
                from None
        return dict(zip(names, got))

    def run_each(self, weights: dict | None = None, contexts: bool = False):
        """``run`` on every calibration batch, in order (an iterator). In segments, every batch passes one
        segment before the next segment's session is made: each weight is read once per pass, not per batch."""
        if not self.segment_bytes:
            return (self.run(feeds, weights, contexts) for feeds in self.data)
        runner = Segmented(self.work, self.external_dir, self.segment_bytes, self._names(contexts), optimize=True,
                           providers=self.providers)
        try:
            return iter(runner.run([dict(feeds) for feeds in self.data], {**self.weights, **(weights or {})},
                                   progress=self.progress))
        except Exception as exc:
            raise InputError(f"onnxruntime could not run the model on the calibration data: {ort_reason(exc)}") \
                from None

    def walk(self, fed: dict, needed: set):
        """For each site of a block in ``needed``, in graph order: (site, [(feeds, its context in the model run with
        ``fed``, its context in the original) for every batch]). Between two sites the caller may put new weights
        into ``fed`` (the site's refitted output projection): the contexts of the later sites see them, as each
        block is compensated seeing the blocks already compensated before it.

        Run whole, the original's contexts come from one pass and each site's from a pass of its own. In segments
        the walk goes once through the segments with two states per batch, the original's and the fed model's:
        a segment runs on the fed state again only for the sites whose context it makes, so a model of any size is
        compensated in about three passes, not one per block."""
        if not self.segment_bytes:
            original = [{s.context: out[s.context] for s in self.sites} for out in self.run_each(contexts=True)]
            for site in self.sites:
                if site.block.index not in needed:
                    continue
                now = self.run_each(fed, contexts=True) if fed else iter(original)
                yield site, [(feeds, o[site.context], ref[site.context])
                             for feeds, o, ref in zip(self.data, now, original)]
            return
        contexts = [s.context for s in self.sites if s.block.index in needed]
        runner = Segmented(self.work, self.external_dir, self.segment_bytes, contexts, optimize=True,
                           providers=self.providers)
        ref = [dict(feeds) for feeds in self.data]
        now = None               # None: the fed model has not diverged from the original yet
        with self.bar(len(runner.parts), "compensating in segments") as bar:
            for k in range(len(runner.parts)):
                here = [s for s in self.sites if s.block.index in needed and s.context in runner.made[k]]
                reads_fed = any(name in fed for name in runner.reads[k])
                if now is None and (reads_fed or here):
                    now = [dict(st) for st in ref]
                start = [dict(st) for st in now] if here else None
                _advance(runner, k, ref, self.weights)
                for site in here:
                    if fed:     # the segment again, with the weights fitted so far
                        states = [dict(st) for st in start]
                        _advance(runner, k, states, {**self.weights, **fed})
                    else:
                        states = ref
                    yield site, [(feeds, st[site.context], r[site.context])
                                 for feeds, st, r in zip(self.data, states, ref)]
                if now is not None:
                    _advance(runner, k, now, {**self.weights, **fed})
                    for st in (*ref, *now):
                        for site in here:
                            st.pop(site.context, None)
                bar.update()
        runner.close()

    def rows(self, feeds: dict, ctx: np.ndarray, site: ProjectionSite) -> np.ndarray:
        """The context as [tokens, features], the padding tokens left out where the mask says so."""
        return self.token_rows(feeds, ctx, site.block, site.context)

    def token_rows(self, feeds: dict, value: np.ndarray, block, name: str) -> np.ndarray:
        """``name``'s ``value`` (a head tensor of ``block``, or the input of its projections, features last) as
        [tokens, features], padding left out."""
        t = next((t for t in block.tensors if t.name == name), None)
        ax = t.axes if t is not None else (value.ndim - 1,)
        if len(ax) != 1:
            raise PlanError(f"block {block.index}: {name!r} carries heads on several axes")
        x = np.moveaxis(value, ax[0], -1)
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
        moments, _ = self.grams({s.block.index: (s.block, s.context) for s in self.sites})
        return {b: (gram - np.outer(total, total) / max(n, 1)) / max(n, 1) for b, (gram, total, n) in moments.items()}

    def grams(self, names: dict, held_out=frozenset()) -> tuple[dict, dict]:
        """Moments over the calibration tokens: ``names`` is {key: (block, tensor name)} of head tensors that
        this session computes (contexts or ``taps``); returns ({key: (sum of x xᵀ, sum of x, tokens)} of the
        batches not in ``held_out``, the same of those in it)."""
        fit, held = {}, {}
        with self.bar(len(self.data), "calibrating") as bar:
            for i, (feeds, out) in enumerate(zip(self.data, self.run_each(contexts=True))):
                acc = held if i in held_out else fit
                for key, (block, name) in names.items():
                    rows = self.token_rows(feeds, out[name], block, name)
                    gram, total, n = acc.get(key, (0.0, 0.0, 0))
                    acc[key] = (gram + rows.T @ rows, total + rows.sum(axis=0), n + len(rows))
                bar.update()
        return fit, held

    def context_means(self, weights: dict | None = None) -> dict[int, np.ndarray]:
        """The mean context vector of every block over the calibration tokens."""
        acc, n = {}, {}
        for feeds, out in zip(self.data, self.run_each(weights, contexts=True)):
            for s in self.sites:
                rows = self.rows(feeds, out[s.context], s)
                acc[s.block.index] = acc.get(s.block.index, 0) + rows.sum(axis=0)
                n[s.block.index] = n.get(s.block.index, 0) + len(rows)
        return {b: acc[b] / max(n[b], 1) for b in acc}


def _advance(runner: Segmented, k: int, states: list, extra: dict):
    try:
        runner.advance(k, states, extra)
    except Exception as exc:   # onnxruntime's own types, in one line as ``Calibrator.run`` gives them
        raise InputError(f"onnxruntime could not run the model on the calibration data: {ort_reason(exc)}") \
            from None


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


OUTPUT_BUDGET = 256 << 20     # calibration batches are cut so that the model's outputs of one stay below this


def open_session(model: onnx.ModelProto, blocks, shapes: dict, data: dict | None, external_dir=None,
                 outputs: bool = True, taps: tuple = (), fed: tuple = (), run: str = "auto",
                 providers=None) -> Calibrator:
    """The shared calibration session on ``model``: ``data`` ({graph input: samples on axis 0}), or synthetic
    inputs when None. Without ``outputs`` it computes the heads' contexts only (activation scores,
    compensation): an LLM's output head, its logits and the transposed embedding that a tied head makes are
    then never computed. ``shapes``: the probe's, to size the batches. ``run``: the model run whole, in
    segments, or ``auto`` (``segments.budget_for``: in segments where it would not fit in memory). ``providers``:
    ONNX Runtime's (``runtime.providers_for``), CPU by default."""
    data = data if data is not None else synth_inputs(model, seed=7, batch=32, seq=16)
    fixed_batch, _ = fixed_sizes(model)          # a model whose batch is fixed takes batches of that size
    if fixed_batch and len(next(iter(data.values()))) % fixed_batch:
        raise InputError(f"the model's batch is fixed at {fixed_batch}; the calibration data's "
                         f"{len(next(iter(data.values())))} samples are not a multiple of it")
    size = fixed_batch or batch_size(model, shapes, data)
    return Calibrator(model, blocks, batches(data, size), external_dir, outputs=outputs, taps=taps, fed=fed,
                      segment_bytes=budget_for(model, run), providers=providers)


def batch_size(model: onnx.ModelProto, shapes: dict, data: dict) -> int:
    """Samples per calibration batch: ``data.BATCH``, fewer when the model's outputs of that many would
    pass ``OUTPUT_BUDGET`` (an LLM's logits: [16, 128, 262144] floats are 2 GB, and ONNX Runtime keeps a few
    tensors of that size alive while it computes them). Sizes from the probe, scaled to the data's length."""
    graph_inputs = [i.name for i in model.graph.input if i.name in shapes]
    probe_shape = shapes[graph_inputs[0]] if graph_inputs else ()
    sample = next(iter(data.values()))
    if len(probe_shape) < 2 or sample.ndim < 2:
        return BATCH
    probe_tokens = max(probe_shape[0] * probe_shape[1], 1)
    per_token = sum(4 * int(np.prod(shapes[o.name])) for o in model.graph.output
                    if o.name in shapes) / probe_tokens
    per_sample = per_token * sample.shape[1]
    return int(max(1, min(BATCH, OUTPUT_BUDGET // max(per_sample, 1))))
