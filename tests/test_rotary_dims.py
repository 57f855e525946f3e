"""The QK circuit cut through a rotary embedding (issue 22): whole pairs of head-size positions kept, the same in
every head of a block, the cos/sin tables cut to the same positions; proved equal to the original with the
dropped positions of every query head zeroed in its Q weights."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import pipeline, prune_model
from onnxprune.cut import HeadDims
from onnxprune.errors import PlanError, RewriteError, VerifyError
from onnxprune.inputs import synth_inputs
from onnxprune.options import PruneOptions
from onnxprune.plan import BlockPlan
from onnxprune.rewrite import rewriter as rewriting
from onnxprune.transforms.subspace import fit_qk_select
from onnxprune.verify import compare, max_abs_diff, reference, run

from conftest import MODELS, cli, matched, random_dims

# half-split (Llama: TorchScript, dynamo, SDPA, opset 23; Mistral; Qwen2), 4 KV groups, partial half-split (Phi),
# partial interleaved (GPT-J), a packed QKV projection sliced into its parts (Phi-3)
ROTARY = ["llama-ts.onnx", "llama-d18.onnx", "llama-ts-sdpa.onnx", "llama-d23-sdpa.onnx", "mistral-d18.onnx",
          "qwen2-ts.onnx", "llama-gqa4-ts.onnx", "llama-gqa4-d18.onnx", "phi-ts.onnx", "phi-d18.onnx",
          "gptj-ts.onnx", "gptj-d18.onnx", "phi3-ts.onnx", "phi3-d18.onnx"]      # Phi-3: packed qkv_proj, sliced
PAIRS = {"llama-ts.onnx": [(0, 4), (1, 5), (2, 6), (3, 7)], "phi-ts.onnx": [(0, 2), (1, 3)],
         "gptj-ts.onnx": [(0, 1), (2, 3)], "llama-gqa4-ts.onnx": [(0, 2), (1, 3)]}


def _units(block):
    paired = {i for p in block.pairs for i in p}
    return [tuple(p) for p in block.pairs] + [(i,) for i in range(block.head_dim) if i not in paired]


def _random_keep(block, rng):
    """Some whole units (pairs, and unturned positions alone), at least one of the first and the last, fewer
    than all."""
    units = _units(block)
    pick = set(rng.permutation(len(units))[: max(1, len(units) // 2)].tolist()) | {0}
    if len(units) > 2:
        pick |= {len(units) - 1}
    if len(pick) == len(units):
        pick.discard(int(rng.integers(1, len(units))))
    return sorted(i for u in pick for i in units[u])


def _select(block, keep):
    return HeadDims.select("qk", block.head_dim, keep, block.num_kv_heads, block.num_heads)


def _cut(state, options, plans):
    return pipeline.verify(pipeline.rewrite(replace(state, plans=plans), options), options)


def _proved(state, options, plans, seed: int, batch: int, seq: int, atol: float = 1e-4):
    """The cut of ``plans``, proved in the pipeline and again at ``batch`` x ``seq``; its reference differs from
    the original (the cut does something)."""
    cut = _cut(state, options, plans)
    assert cut.max_error is not None and cut.max_error <= atol
    ref = reference(state.model, state.blocks, cut.plans)
    feeds = synth_inputs(state.model, seed=seed, batch=batch, seq=seq)
    assert compare(ref, cut.pruned, feeds, {}) <= atol
    assert max_abs_diff(run(state.model, feeds), run(ref, feeds)) > 1e-4
    return cut


def test_the_matcher_finds_the_rotary_pairs_and_tables():
    """Half-split pairs (i, i + D/2), partial rotary pairs inside its part, interleaved pairs (2i, 2i + 1); the
    cos and sin that the queries and the keys are multiplied by, in every block."""
    for name, pairs in PAIRS.items():
        state, _ = matched(name)
        for b in state.blocks:
            assert [tuple(p) for p in b.pairs] == pairs, name
            assert len(b.tables) == 4 and b.selects_dims       # cos and sin, for Q and for K
    bert, _ = matched("bert-ts.onnx")
    assert not any(b.selects_dims for b in bert.blocks)


@pytest.mark.parametrize("name", ROTARY)
@pytest.mark.parametrize("seed,some", [(0, False), (1, True), (2, False)])
def test_random_pair_selections_equal_the_zeroed_original(name, seed, some):
    """Random whole-pair selections (with random OV maps and dropped heads on one seed): the pruned model (full
    checker, strict shape inference) equals the original with the dropped positions of Q zeroed, at other batch
    sizes and lengths too; that reference really differs from the original, and Q and K shrink."""
    state, options = matched(name)
    rng = np.random.default_rng(seed)
    plans, keeps = {}, {}
    for b in state.blocks:
        keeps[b.index] = _random_keep(b, rng)
        heads = tuple(h for g in b.kv_groups[: max(1, len(b.kv_groups) // 2)] for h in g) if some \
            else tuple(range(b.num_heads))
        dims = (_select(b, keeps[b.index]),) + ((random_dims(b, "ov", 3, rng),) if some else ())
        plans[b.index] = BlockPlan(heads, dims=dims)
    cut = _proved(state, options, plans, seed=7, batch=3, seq=11)
    widths = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    for b in state.blocks:
        for role in ("q", "k"):
            p = b.projection(role)
            if len(b.tensor(p.weight).roles) > 1:         # packed: Q, K and V in one weight
                continue
            n = len(plans[b.index].kept_heads) if role == "q" else len(b.kept_kv_heads(plans[b.index].kept_heads))
            assert widths[p.weight][p.head_axis] == n * len(keeps[b.index]), (role, b.index)


# q/k norms over the head size (Qwen3, Gemma 3; their multi-query form; opset 23; Optimum): RMS norms written out,
# which the cut passes (the norms' means of squares rescaled); the multi-query K is cut at its broadcast
NORMED = ["qwen3-ts.onnx", "qwen3-d18.onnx", "qwen3-d23-sdpa.onnx", "gemma3-ts.onnx", "gemma3-d18.onnx",
          "gemma3-d23-sdpa.onnx", "gemma3-mqa-ts.onnx", "gemma3-mqa-d18.onnx", "optimum-qwen3-nopast.onnx",
          "optimum-gemma3-nopast.onnx"]


def _norm_plans(state, seed, drop: bool = False):
    """Random whole pairs per block; ``drop``: the first head of each KV group dropped too (the norms' means are
    then rescaled along the head size, not along the heads, which shrink as well)."""
    rng = np.random.default_rng(seed)
    return {b.index: BlockPlan(tuple(h for h in range(b.num_heads) if not drop or h not in [g[0] for g in b.kv_groups]),
                               dims=(_select(b, _random_keep(b, rng)),))
            for b in state.blocks}


@pytest.fixture
def below_norms(monkeypatch):
    """The matcher as for a norm it cannot pass (a fused op, a LayerNorm that centres): the cut starts below."""
    from onnxprune.match import build
    monkeypatch.setattr(build, "rms_means", lambda flow, found: {})


@pytest.mark.parametrize("name", NORMED)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_qk_cut_through_rms_q_k_norms_equals_the_original_with_q_and_k_columns_zeroed(name, seed):
    """Whole rotary pairs kept through RMS q/k norms: W_q and W_k (and the norms' weights, and cos/sin) keep the
    kept positions, each norm's mean of squares is multiplied by kept / D; equal to the original with the dropped
    columns of W_q and W_k zeroed, at other sizes too. A multi-query block's one K head, whose norm lies above
    its broadcast, is gathered at the broadcast (its projection whole): still exact."""
    state, options = matched(name)
    plans = _norm_plans(state, seed, drop=seed == 1)
    assert all(b.norm_means for b in state.blocks)
    cut = _proved(state, options, plans, seed=9, batch=2, seq=6)
    after = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    for b in state.blocks:
        keep = len(plans[b.index].dims[0].keep)
        q, k = b.projection("q"), b.projection("k")
        assert after[q.weight][q.head_axis] == len(plans[b.index].kept_heads) * keep
        if b.num_kv_heads == 1:            # the one K head: cut below its norm, at the broadcast
            assert b.cut_points and k is None
        else:
            assert not b.cut_points and after[k.weight][k.head_axis] == b.num_kv_heads * keep
    means = sum(n.op_type == "Mul" and n.name.endswith("__kept_share") for n in cut.pruned.graph.node)
    assert means == sum(len(b.norm_means) for b in state.blocks)


@pytest.mark.parametrize("fault", ["mean not rescaled", "K left whole in the reference"])
def test_a_cut_through_the_norms_without_its_rescale_or_its_k_columns_fails_the_proof(monkeypatch, fault):
    """Planted faults: the norms' means left as they are (they then average over the kept positions only), or the
    reference's K columns left whole (its norm then sees what the pruned one does not)."""
    from onnxprune import verify
    from onnxprune.rewrite.rewriter import Rewriter
    state, options = matched("qwen3-d18.onnx")
    if fault == "mean not rescaled":
        monkeypatch.setattr(Rewriter, "_plan_norm_mean", lambda self, block, node, lays: None)
    else:
        real = verify.written
        monkeypatch.setattr(verify, "written", lambda b, c: [t for t in real(b, c) if "k" not in t.roles])
    with pytest.raises(VerifyError, match="differs"):
        _cut(state, options, _norm_plans(state, 0))


def test_a_norm_that_centres_is_cut_below_it():
    """Cohere's q/k norms are LayerNorms (the mean taken off first): zeros do not stay zeros through them, so the
    cut starts below them."""
    state, _ = matched("cohere-d18.onnx")
    assert all(b.cut_points and not b.norm_means for b in state.blocks)


@pytest.mark.parametrize("name", NORMED)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_qk_cut_below_the_q_k_norms_equals_the_original_with_the_queries_zeroed_there(name, seed, below_norms):
    """Where the norm cannot be passed: whole rotary pairs kept below the q/k norms, the norms (and the Q/K
    projections) see every position, a Gather at each cut point (and at the broadcast of a multi-query K) keeps
    the pairs; equal to the original with the queries zeroed at the same place, at other sizes too; the
    projections keep their widths."""
    state, options = matched(name)
    plans = _norm_plans(state, seed)
    assert all(b.cut_points and not b.norm_means for b in state.blocks)
    cut = _proved(state, options, plans, seed=9, batch=2, seq=6)
    before = {i.name: list(i.dims) for i in state.model.graph.initializer}
    after = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    q = state.blocks[0].projection("q")
    assert after[q.weight] == before[q.weight]


def test_zeroing_the_queries_above_the_norm_fails_the_proof(monkeypatch, below_norms):
    """Planted fault: a cut below the norm, its reference written into W_q (above the norm, which then sees other
    values)."""
    from onnxprune import verify
    state, options = matched("qwen3-d18.onnx")
    monkeypatch.setattr(verify, "query_cut_points", lambda model, block: [])
    with pytest.raises(VerifyError, match="differs"):
        _cut(state, options, _norm_plans(state, 0))


@pytest.mark.parametrize("name,words,below", [("phi-ts.onnx", "cannot pass a rotary embedding", False),
                                              ("gemma3-ts.onnx", "keeps whole positions through the norm", False),
                                              ("gemma3-ts.onnx", "keeps whole positions below the norm", True)])
def test_a_rotation_through_a_rotary_embedding_or_a_q_k_norm_is_refused_with_the_reason(name, words, below,
                                                                                         monkeypatch):
    if below:
        from onnxprune.match import build
        monkeypatch.setattr(build, "rms_means", lambda flow, found: {})
    state, options = matched(name)
    rng = np.random.default_rng(0)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "qk", 4, rng),)) for b in state.blocks}
    with pytest.raises(RewriteError, match=words):
        pipeline.rewrite(replace(state, plans=plans), options)


def test_compensation_after_a_qk_cut_below_the_q_k_norms_is_refused(below_norms):
    from onnxprune.errors import PlanError as Plan
    model = onnx.load(str(MODELS / "gemma3-ts.onnx"))
    with pytest.raises(Plan, match="below the q/k norms"):
        prune_model(model, qk_dims=0.5, calib=synth_inputs(model, seed=1, batch=8, seq=8), compensate="auto")


@pytest.mark.parametrize("name", ["gemma3-ts.onnx", "gemma3-mqa-d18.onnx"])
def test_compensation_after_a_qk_cut_through_the_norms_is_proved(name):
    """Through RMS q/k norms the cut is written into W_q and W_k (the one multi-query K head: gathered at its
    broadcast, so only W_q), so compensation calibrates the cut model and refits its output projections."""
    model = onnx.load(str(MODELS / name))
    r = prune_model(model, qk_dims=0.5, calib=synth_inputs(model, seed=1, batch=16, seq=8), compensate="auto")
    assert r.max_error <= 1e-4 and r.compensate == "auto" and r.fits
    assert all(f.rank == next(b.head_dim for b in r.blocks if b.index == f.block) // 2 for f in r.dim_fits)


@pytest.mark.parametrize("name", ["llama-d18.onnx", "gptj-ts.onnx"])
def test_half_a_rotary_pair_is_refused(name):
    state, options = matched(name)
    plans = {}
    for b in state.blocks:
        pair = b.pairs[0]
        keep = [i for i in range(b.head_dim) if i != pair[1]]
        plans[b.index] = BlockPlan(tuple(range(b.num_heads)), dims=(_select(b, keep),))
    with pytest.raises(RewriteError, match=r"part of the rotary pair \[%d, %d\]" % tuple(state.blocks[0].pairs[0])):
        pipeline.rewrite(replace(state, plans=plans), options)


@pytest.mark.parametrize("fault", ["shifted", "uncut"])
def test_a_rotary_table_cut_wrongly_or_left_uncut_fails(monkeypatch, fault):
    """Planted faults: the cos/sin tables gathered at positions shifted by one (the proof fails), or left whole
    (the rewrite's strict shape inference refuses the model before any proof)."""
    state, options = matched("llama-d18.onnx")
    rng = np.random.default_rng(3)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(_select(b, _random_keep(b, rng)),))
             for b in state.blocks}
    original = rewriting.Rewriter._plan_table

    def planted(self, block, table, lays, qk=None):
        if fault == "uncut":
            return
        lay = lays[self.nodes[table.node].outputs[0].name]
        ax = block.tensor(self.nodes[table.node].outputs[0].name).dim_axis
        size = self.shapes[self.nodes[table.node].outputs[0].name][ax]
        shifted = {**lay.keep, ax: (lay.keep[ax] + 1) % size}
        original(self, block, table, {**lays, self.nodes[table.node].outputs[0].name:
                                      replace(lay, maps={**lay.maps, ax: type(lay.maps[ax]).select(shifted[ax])})},
                 qk)
    monkeypatch.setattr(rewriting.Rewriter, "_plan_table", planted)
    with pytest.raises(VerifyError if fault == "shifted" else RewriteError):
        _cut(state, options, plans)


def test_the_fit_drops_the_pair_that_carries_nothing_and_keeps_the_busy_one():
    """Every query head's W_q columns at positions 1 and 5 of block 0 zeroed: that pair adds nothing to the scores,
    so a fit that keeps 6 of 8 positions drops it; the pair the fit keeps first is the one with the most energy.
    The same fit on the unchanged model keeps another set."""
    model = onnx.load(str(MODELS / "llama-d18.onnx"))
    state, _ = matched("llama-d18.onnx")
    b = state.blocks[0]
    q = b.projection("q")
    init = next(i for i in model.graph.initializer if i.name == q.weight)
    w = numpy_helper.to_array(init).copy()
    cols = [h * b.head_dim + i for h in range(b.num_heads) for i in (1, 5)]
    np.moveaxis(w, q.head_axis, 0)[cols] = 0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    calib = synth_inputs(model, seed=2, batch=32, seq=16)
    r = prune_model(model, qk_dims=0.25, calib=calib)
    assert r.max_error <= 1e-4
    fit = next(f for f in r.dim_fits if f.block == 0 and f.circuit == "qk")
    assert fit.rank == 6 and fit.positions == (0, 2, 3, 4, 6, 7)


def test_fit_qk_select_ranks_pairs_by_their_share_and_keeps_every_part():
    """Units ranked by their share (a pair ½ tr(C_q) tr(C_k) per head, an unturned position C_q,ii C_k,ii), taken
    while they fit in the rank; a part that a Slice cuts out keeps its best unit first; with pairs only, an odd
    rank keeps one fewer."""
    d = 8
    cq = {0: np.diag([1.0, 9, 1, 1, 1, 9, 1, 0.5])}
    ck = {0: np.diag([1.0, 1, 1, 1, 1, 1, 1, 0.5])}
    pairs = [(0, 4), (1, 5), (2, 6)]          # 3 and 7 turn with nothing (a partial rotary's rest)
    assert fit_qk_select(cq, ck, [(0,)], pairs, d, 3).keep.tolist() == [1, 3, 5]   # (1, 5): 18; 3: 1; 7: 0.25
    assert fit_qk_select(cq, ck, [(0,)], pairs, d, 4).keep.tolist() == [0, 1, 4, 5]      # (0, 4): 2
    assert fit_qk_select(cq, ck, [(0,)], pairs, d, 2, parts=[(7,)]).keep.tolist() == [3, 7]
    four = {0: np.diag([1.0, 2, 1, 2])}
    assert fit_qk_select(four, four, [(0,)], [(0, 2), (1, 3)], 4, 3).keep.tolist() == [1, 3]


def test_the_cli_cuts_qk_through_rotary_and_reports_the_pairs(tmp_path):
    """--qk-dims on a Llama export: the K cache shrinks, the report says which positions were kept, and the
    summary says that whole pairs were kept and the tables cut."""
    import json
    data = tmp_path / "calib.npz"
    model = onnx.load(str(MODELS / "llama-ts.onnx"))
    np.savez(data, **synth_inputs(model, seed=1, batch=16, seq=16))
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    res = cli(str(MODELS / "llama-ts.onnx"), "--qk-dims", "0.5", "--calib", str(data), "-o", str(out), "--report",
              str(rep))
    assert res.returncode == 0, res.stderr
    assert "whole pairs of head-size positions" in res.stdout
    report = json.loads(rep.read_text())
    for b in report["blocks"]:
        kept = b["kept_positions"]["qk"]
        assert len(kept) == b["qk_rank"] == 4
        assert all((i in kept) == (i + 4 in kept) for i in range(4))      # whole half-split pairs
    assert report["kv_cache_bytes_per_token"]["after"] < report["kv_cache_bytes_per_token"]["before"]


def test_the_budget_cuts_qk_through_rotary_and_stays_exact():
    """The attention budget on Llama now has QK steps too (whole pairs): it takes some at 50%, every QK rank it
    keeps is even, and the compensated cut is proved."""
    model = onnx.load(str(MODELS / "llama-ts.onnx"))
    calib = synth_inputs(model, seed=3, batch=32, seq=16)
    r = prune_model(model, attention_ratio=0.5, calib=calib)
    assert r.max_error <= 1e-4
    qk = [f for f in r.dim_fits if f.circuit == "qk"]
    assert qk and all(f.rank % 2 == 0 and f.positions is not None for f in qk)


# MatMulNBits (blocks of 32 and 128), int4 QDQ, int8 QDQ with quantized activations (per tensor and per channel)
QUANTIZED = ["llama-nbits32.onnx", "llama-nbits128.onnx", "llama-int4qdq32.onnx", "llama-qdq.onnx", "llama-qdq-pc.onnx"]


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_models_keep_rotary_pairs_and_v_positions_in_their_form(name):
    """A selection needs no re-quantization: Q and K keep their quantized form (the same quantized ops, fewer
    output features), and so do V and the output projection under an OV cut that keeps positions (runs of 16,
    which a block of MatMulNBits can be re-packed into); the reference zeroes the dropped queries and the dropped
    context positions where the output projection reads them, and the proof holds on ONNX Runtime."""
    from collections import Counter
    model = onnx.load(str(MODELS / name))
    ops = lambda m: Counter(n.op_type for n in m.graph.node if n.op_type not in ("Constant", "Gather"))
    calib = synth_inputs(model, seed=4, batch=8, seq=16)
    for kw in (dict(qk_dims=0.5), dict(v_dims=0.5), dict(qk_dims=0.5, v_dims=0.5)):
        r = prune_model(model, calib=calib, **kw)
        assert r.max_error is not None and r.max_error <= 1e-4, kw
        assert {f.circuit for f in r.dim_fits} == {c for c, k in (("qk", "qk_dims"), ("ov", "v_dims")) if k in kw}
        assert all(f.positions is not None and f.rank < 32 for f in r.dim_fits)
        assert ops(r.model) == ops(model)
        assert r.model.ByteSize() < model.ByteSize()


@pytest.mark.parametrize("name", ["bert-qdq.onnx", "bert-nbits32.onnx", "bert-dyn.onnx"])
def test_quantized_models_keep_v_positions_and_refuse_a_rotation(name):
    """Without a rotary embedding a QK cut is a rotation, which would re-quantize: refused; V positions are cut in
    the quantized form, proved against the quantized original with the dropped context positions zeroed, which
    is another model than the original."""
    from onnxprune.quant import float_view
    from onnxprune.verify import reference
    model = onnx.load(str(MODELS / name))
    with pytest.raises(PlanError, match="re-quantize"):
        prune_model(model, qk_dims=0.5)
    r = prune_model(model, v_dims=0.5)
    assert r.max_error is not None and r.max_error <= 1e-4
    view, qv = float_view(model)
    ref = reference(view, r.blocks, r.plans, qv)
    feeds = synth_inputs(model, seed=3, batch=2, seq=9)
    assert max_abs_diff(run(model, feeds), run(ref, feeds)) > 1e-4
    assert compare(ref, r.model, feeds, {}) <= 1e-4


@pytest.mark.parametrize("fault", ["queries", "context"])
def test_a_quantized_reference_that_misses_the_queries_or_the_context_fails_the_proof(monkeypatch, fault):
    """Planted faults: the quantized reference leaves the queries whole, or the context positions that the OV cut
    drops (nothing zeroed there): the proof fails."""
    from onnxprune import verify
    model = onnx.load(str(MODELS / "llama-nbits32.onnx"))
    real = verify.zeroed_queries
    if fault == "queries":
        monkeypatch.setattr(verify, "zeroed_queries", lambda *a, **k: ({}, real(*a, **k)[1]))
    else:
        monkeypatch.setattr(verify, "zeroed_queries", lambda *a, **k: (real(*a, **k)[0], {}))
    with pytest.raises(VerifyError, match="differs"):
        prune_model(model, **({"qk_dims": 0.5} if fault == "queries" else {"v_dims": 0.5}))


# ---------------------------------------------------------------- ONNX Runtime's fused Attention (packed QKV)
ORT_ATTENTION = ["bert-ort-attention.onnx", "clip-vision-ort-attention.onnx", "bert-ort-attention-fp16.onnx"]


@pytest.mark.parametrize("name", ORT_ATTENTION)
@pytest.mark.parametrize("qk,ov,some", [(3, None, False), (None, 5, True), (2, 6, True), (4, 4, False)])
def test_ort_attention_takes_its_own_qk_and_v_widths(name, qk, ov, some):
    """ORT's Attention with one packed QKV weight and bias: the Q, K and V sections mapped each by its side of
    its circuit, ``qkv_hidden_sizes`` set to the new widths and the scale pinned to the original head size (also
    where Q/K and V keep one width, and the op's default would take 1/sqrt of it); equal to the projected original
    (fp16 to its tolerance), at other batch sizes and lengths too."""
    state, options = matched(name)
    rng = np.random.default_rng(7)
    plans = {}
    for b in state.blocks:
        dims = tuple(random_dims(b, c, r, rng) for c, r in (("qk", qk), ("ov", ov)) if r)
        heads = tuple(range(b.num_heads))[::2] if some else tuple(range(b.num_heads))
        plans[b.index] = BlockPlan(heads, dims=dims)
    cut = _cut(state, options, plans)
    assert cut.max_error is not None and cut.max_error <= options.tolerance("fp16" in name)
    n = len(plans[0].kept_heads)
    for node in (x for x in cut.pruned.graph.node if x.op_type == "Attention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert list(attrs["qkv_hidden_sizes"]) == [n * (qk or 8), n * (qk or 8), n * (ov or 8)]
        assert attrs["scale"] == pytest.approx(1 / np.sqrt(8))
    if "fp16" not in name:
        ref = reference(state.model, state.blocks, cut.plans)
        feeds = synth_inputs(state.model, seed=8, batch=3, seq=9)
        assert compare(ref, cut.pruned, feeds, {}) <= 1e-4


def test_ort_attention_without_the_pinned_scale_fails_the_proof(monkeypatch):
    """Planted fault: the scale left to the op's default, 1/sqrt of the new Q head size."""
    from onnxprune.rewrite import sites
    state, options = matched("bert-ort-attention.onnx")
    rng = np.random.default_rng(1)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "qk", 3, rng),)) for b in state.blocks}
    real = sites.head_attrs

    def no_scale(node, block, kept, width):
        new = real(node, block, kept, width)
        return {**new, "scale": 1 / np.sqrt(3)}
    monkeypatch.setattr(sites, "head_attrs", no_scale)
    with pytest.raises(VerifyError, match="differs"):
        _cut(state, options, plans)


@pytest.mark.parametrize("name", ["bert-ort-mha.onnx", "onnx-attention-3d-d23.onnx"])
@pytest.mark.parametrize("qk,ov,some", [(3, None, False), (None, 5, True), (2, 6, True), (4, 4, False)])
def test_fused_ops_with_their_own_qkv_inputs_take_their_own_qk_and_v_widths(name, qk, ov, some):
    """ORT's MultiHeadAttention and ONNX's Attention (opset 23, 8 heads on 2 KV heads) read Q, K and V as inputs of
    their own (V's head size may differ from Q's); MultiHeadAttention also adds their packed [q | k | v] bias
    itself. Each input and each section of the bias mapped by its side, the scale pinned to the original head
    size where Q narrows; equal to the projected original (the packed bias's q part projected too), at other
    sizes as well, and that reference differs from the original."""
    state, options = matched(name)
    rng = np.random.default_rng(5)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads))[::2] if some else tuple(range(b.num_heads)),
                                dims=tuple(random_dims(b, c, r, rng) for c, r in (("qk", qk), ("ov", ov)) if r))
             for b in state.blocks}
    cut = _proved(state, options, plans, seed=8, batch=3, seq=9)
    n = len(plans[0].kept_heads)
    widths = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    for node in (x for x in cut.pruned.graph.node if x.op_type in ("MultiHeadAttention", "Attention")):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("num_heads", attrs.get("q_num_heads")) == n
        assert attrs.get("scale") == (pytest.approx(1 / np.sqrt(8)) if qk else None)
    for b in state.blocks:
        n_kv = len(b.kept_kv_heads(plans[b.index].kept_heads))
        assert widths[b.projection("v").weight][-1] == n_kv * (ov or 8)
        assert widths[b.projection("q").weight][-1] == n * (qk or 8)


@pytest.mark.parametrize("name,fault", [("bert-ort-mha.onnx", "the scale of the new head size"),
                                        ("bert-ort-mha.onnx", "the packed bias left whole"),
                                        ("onnx-attention-3d-d23.onnx", "the scale of the new head size")])
def test_fused_ops_with_their_own_qkv_inputs_without_the_scale_or_the_bias_fail_the_proof(monkeypatch, name, fault):
    """Planted faults: the scale of the cut head size (the op's default), or the reference's q part of the packed
    bias left unprojected."""
    from onnxprune import verify
    from onnxprune.rewrite import sites
    state, options = matched(name)
    rng = np.random.default_rng(1)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "qk", 3, rng),)) for b in state.blocks}
    if fault == "the scale of the new head size":
        monkeypatch.setattr(sites, "original_scale", lambda block: float(1 / np.sqrt(3)))
    else:
        real = verify.written
        monkeypatch.setattr(verify, "written", lambda b, c: [t for t in real(b, c) if len(t.roles) == 1])
    with pytest.raises(VerifyError, match="differs"):
        _cut(state, options, plans)


def test_qk_moments_through_the_projection_input_equal_the_queries_own():
    """Where the queries are not a tensor of their own (ORT's Attention projects them inside), their moments
    come from the input's and the weights: on an unfused BERT both ways agree."""
    from onnxprune.calibration.session import open_session
    from onnxprune.calibration.sites import projection_input, projection_output
    from onnxprune.transforms import subspace
    state, _ = matched("bert-ts.onnx")
    calib = synth_inputs(state.model, seed=1, batch=16, seq=8)
    taps = tuple(n for b in state.blocks for r in ("q", "k")
                 for n in (projection_output(state.model, b, r), projection_input(state.model, b, r)))
    cal = open_session(state.model, state.blocks, state.shapes, calib, None, outputs=False, taps=taps)
    direct = subspace.Moments(state.model, state.blocks, cal, ("qk",))
    real = subspace.projection_output
    subspace.projection_output = lambda *a: None
    try:
        through = subspace.Moments(state.model, state.blocks, cal, ("qk",))
    finally:
        subspace.projection_output = real
    for b in state.blocks:
        for role in ("q", "k"):
            for i, c in direct.fit[b.index][role].items():
                assert np.allclose(through.fit[b.index][role][i], c, rtol=1e-6, atol=1e-6 * np.abs(c).max())


def test_the_cli_fits_and_budgets_a_fused_attention_model(tmp_path):
    """--qk-dims with --calib and the budget on ORT's Attention: fitted from the input's moments, proved."""
    model = onnx.load(str(MODELS / "bert-ort-attention.onnx"))
    calib = synth_inputs(model, seed=2, batch=32, seq=16)
    r = prune_model(model, qk_dims=0.5, calib=calib)
    assert r.max_error <= 1e-4 and {f.rank for f in r.dim_fits} == {4} and r.dims_source == "calibration"
    b = prune_model(model, attention_ratio=0.5, calib=calib)
    assert b.max_error <= 1e-4 and any(f.circuit == "qk" for f in b.dim_fits)


@pytest.mark.parametrize("name", ["qwen3-d18.onnx", "gemma3-mqa-d18.onnx"])
def test_the_budget_cuts_qk_through_rms_q_k_norms(name):
    """Through RMS q/k norms a QK step is written into W_q (and W_k), so the budget prices and takes QK ranks
    there (before, such blocks could only lose heads and OV rank); the plan is compensated and proved."""
    model = onnx.load(str(MODELS / name))
    r = prune_model(model, attention_ratio=0.5, calib=synth_inputs(model, seed=3, batch=32, seq=16))
    assert r.max_error <= 1e-4 and r.compensate == "auto"
    assert r.budget.chosen == "heads" or any(f.circuit == "qk" for f in r.dim_fits)
    from onnxprune.pipeline import wanted_circuits, State
    assert wanted_circuits(State(original=model, model=model, feeds=None, matched=r and matched(name)[0].matched),
                           PruneOptions(attention_ratio=0.5, calib={})) == ("qk", "ov")


def test_a_multi_query_key_below_its_norm_is_fitted_where_it_is_broadcast():
    """Gemma 3's one K head has no projection that the block follows (its norm and RoPE lie above the broadcast):
    the fit reads it at the broadcast, the cut keeps the same pairs there, and the cut with V dims is proved."""
    model = onnx.load(str(MODELS / "gemma3-mqa-d18.onnx"))
    r = prune_model(model, qk_dims=0.5, v_dims=0.5, calib=synth_inputs(model, seed=1, batch=16, seq=16))
    assert r.max_error <= 1e-4 and r.dims_source == "calibration"
    qk = [f for f in r.dim_fits if f.circuit == "qk"]
    assert qk and all(f.rank == 4 and all((i in f.positions) == (i + 4 in f.positions) for i in range(4)) for f in qk)


def test_the_summary_says_what_shrinks_in_a_multi_query_cache(tmp_path):
    """One KV head: the summary names the K cut (pairs) and the V cut (rank) that shrink its cache."""
    data = tmp_path / "calib.npz"
    model = onnx.load(str(MODELS / "gemma3-mqa-d18.onnx"))
    np.savez(data, **synth_inputs(model, seed=1, batch=16, seq=16))
    res = cli(str(MODELS / "gemma3-mqa-d18.onnx"), "--qk-dims", "0.5", "--v-dims", "0.5", "--calib", str(data),
              "-o", str(tmp_path / "m.onnx"))
    assert res.returncode == 0, res.stderr
    assert "the cache shrinks only inside the head: K by its QK pairs and V by its OV rank" in res.stdout
    assert "through the q/k norms (RMS) the QK cut keeps its pairs in W_q and in the norms' weights" in res.stdout
    assert "the one K head of a multi-query block is cut below its norm, at its broadcast" in res.stdout
