"""Cutting inside the heads (issue 22): the QK circuit through a rank-r map on Q and K, the OV circuit on V and the
output projection's rows, fitted from calibration moments or from the weights; each proved equal to the original
with the map's projection written into its weights."""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from onnxprune import pipeline, prune_model
from onnxprune.cut import HeadDims, reference_rows, written
from onnxprune.errors import PlanError, RewriteError, VerifyError
from onnxprune.inputs import synth_inputs
from onnxprune.options import PruneOptions
from onnxprune.plan import BlockPlan, keep_rank
from onnxprune.report import build_report, format_table
from onnxprune.transforms.subspace import circuit_error, fit_ov, fit_qk
from onnxprune.verify import compare, max_abs_diff, reference, run

from conftest import MODELS, cli, matched, random_dims


def _cut(state, options, plans):
    return pipeline.verify(pipeline.rewrite(replace(state, plans=plans), options), options)


# BERT (TorchScript, dynamo, opset 23 SDPA), DistilBERT, RoBERTa, BART, ViT, CLIP, Swin, T5's position bias, Whisper
QK_FAMILIES = ["bert-ts.onnx", "bert-d18.onnx", "bert-d23-sdpa.onnx", "distilbert-ts.onnx", "roberta-d18.onnx",
               "bart-ts.onnx", "vit-ts.onnx", "clip-vision-d18.onnx", "swin-ts.onnx", "t5-encoder-ts.onnx",
               "whisper-d18.onnx", "gpt2-ts.onnx", "gpt2-d18.onnx",      # GPT-2: one packed c_attn, split
               "sdpa-runtime-scale-ts.onnx"]      # the scale computed from Shape(q)[-1] at run time: pinned


@pytest.mark.parametrize("name", QK_FAMILIES)
@pytest.mark.parametrize("qk,ov,some", [(3, None, False), (5, 2, True), (1, 7, False)])
def test_random_maps_inside_the_heads_equal_the_projected_original(name, qk, ov, some):
    """Random d x r maps on Q and K (and V and W_o): the pruned model (full checker, strict shape inference in
    the rewrite) equals the original with W_q,h <- W_q,h B Aᵀ (and W_o,h <- A Bᵀ W_o,h), at other batch sizes and
    lengths too, and that projected original really differs from the original."""
    state, options = matched(name)
    rng = np.random.default_rng(qk)
    plans = {}
    for b in state.blocks:
        heads = tuple(range(b.num_heads))[::2] if some else tuple(range(b.num_heads))
        dims = (random_dims(b, "qk", min(qk, b.head_dim), rng),) + ((random_dims(b, "ov", ov, rng),) if ov else ())
        plans[b.index] = BlockPlan(heads, dims=dims)
    cut = _cut(state, options, plans)
    assert cut.max_error is not None and cut.max_error <= 1e-4
    block = state.blocks[0]
    q = block.projection("q")
    widths = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    n, r = len(plans[0].kept_heads), min(qk, block.head_dim)
    packed = len(block.tensor(q.weight).roles) > 1          # GPT-2's c_attn: Q, K and V side by side
    assert widths[q.weight][q.head_axis] == (n * (2 * r + (ov or block.head_dim)) if packed else n * r)
    ref = reference(state.model, state.blocks, cut.plans)
    feeds = synth_inputs(state.model, seed=5, batch=3, seq=7)
    assert compare(ref, cut.pruned, feeds, {}) <= 1e-4
    assert max_abs_diff(run(state.model, feeds), run(ref, feeds)) > 1e-3


# decoders whose QK circuit a map cannot pass (rotary, q/k norms): their OV circuit, with GQA (4 KV groups),
# rotary half-split (Llama), interleaved (GPT-J) and partial (Phi, StableLM), q/k norms (Qwen3, Gemma 3), the
# ONNX Attention op of opset 23, an Optimum export without cache, multi-query (Gemma 3 270M's one KV head, its V
# followed above the broadcast up to its projection)
OV_FAMILIES = ["llama-ts.onnx", "llama-gqa4-ts.onnx", "llama-gqa4-d23-sdpa.onnx", "gptj-ts.onnx", "phi-ts.onnx",
               "stablelm-ts.onnx", "qwen3-d18.onnx", "gemma3-ts.onnx", "gemma3-d23-sdpa.onnx", "cohere-d18.onnx",
               "optimum-qwen3-nopast.onnx", "gemma3-mqa-d18.onnx", "gemma3-mqa-ts.onnx", "phi3-ts.onnx", "phi3-d18.onnx"]


@pytest.mark.parametrize("name", OV_FAMILIES)
@pytest.mark.parametrize("rank", [1, 5])
def test_random_ov_maps_in_decoders_equal_the_projected_original(name, rank):
    state, options = matched(name)
    rng = np.random.default_rng(rank)
    plans = {}
    for b in state.blocks:
        heads = tuple(h for g in b.kv_groups[:max(1, len(b.kv_groups) // 2)] for h in g) if rank == 1 \
            else tuple(range(b.num_heads))
        plans[b.index] = BlockPlan(heads, dims=(random_dims(b, "ov", rank, rng),))
    cut = _cut(state, options, plans)
    assert cut.max_error is not None and cut.max_error <= 1e-4
    ref = reference(state.model, state.blocks, cut.plans)
    feeds = synth_inputs(state.model, seed=6, batch=2, seq=9)
    assert compare(ref, cut.pruned, feeds, {}) <= 1e-4
    assert max_abs_diff(run(state.model, feeds), run(ref, feeds)) > 1e-4


@pytest.mark.parametrize("circuit", ["ov", "qk"])
def test_a_map_on_one_side_only_fails_the_proof(monkeypatch, circuit):
    """Planted fault: the reference written with A alone (B taken as A) is not what the cut computes."""
    from onnxprune import cut as cutting
    state, options = matched("bert-ts.onnx")
    rng = np.random.default_rng(0)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, circuit, 4, rng),))
             for b in state.blocks}
    monkeypatch.setattr(cutting, "reference_rows", lambda rows, a, b: reference_rows(rows, a, a))
    with pytest.raises(VerifyError, match="differs from the masked original"):
        _cut(state, options, plans)


def test_a_scale_computed_from_the_runtime_head_size_is_pinned(monkeypatch):
    """TorchScript's SDPA without a scale (Optimum's MiniLM) computes it from Shape(q)[-1]: each block has one
    ``head_size`` site (the Cast of that size), a QK cut makes it read the original size, and the pruned model
    computes no scale from its new head size. Planted fault: without the pin the proof fails."""
    from onnxprune.rewrite import sites
    state, options = matched("sdpa-runtime-scale-ts.onnx")
    assert [sum(s.kind == "head_size" for s in b.sites) for b in state.blocks] == [1, 1]
    rng = np.random.default_rng(2)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "qk", 4, rng),)) for b in state.blocks}
    cut = _cut(state, options, plans)
    assert cut.max_error <= 1e-4
    casts = {n.name: n for n in cut.pruned.graph.node if n.op_type == "Cast"}
    pinned = [onnx.numpy_helper.to_array(i).tolist() for i in cut.pruned.graph.initializer
              if any(i.name == casts[s.node].input[0] for b in state.blocks for s in b.sites if s.kind == "head_size")]
    assert pinned == [[8], [8]]           # the original head size, where the cut's is 4
    state, options = matched("sdpa-runtime-scale-ts.onnx")
    heads = _cut(state, options, {b.index: BlockPlan((0, 2)) for b in state.blocks})
    assert heads.max_error == 0.0        # keeping heads leaves the size as it is: nothing pinned
    monkeypatch.setitem(sites.SITE_PLANNERS, "head_size", lambda *a: None)
    state, options = matched("sdpa-runtime-scale-ts.onnx")
    with pytest.raises(VerifyError, match="differs from the masked original"):
        _cut(state, options, plans)


def test_a_qk_map_written_into_k_instead_of_q_fails_the_proof(monkeypatch):
    """Planted fault: the reference writes the circuit's map into the wrong projection."""
    from onnxprune import cut, verify
    state, options = matched("bert-d18.onnx")
    rng = np.random.default_rng(1)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "qk", 4, rng),)) for b in state.blocks}
    monkeypatch.setitem(verify.WRITTEN, "qk", "k")
    with pytest.raises(VerifyError, match="differs from the masked original"):
        _cut(state, options, plans)
    assert cut.WRITTEN["qk"] == "k"      # the same table: the fault was really planted


@pytest.mark.parametrize("name,circuit,words", [
    ("llama-ts.onnx", "qk", "cannot pass a rotary embedding"),     # a rotation through rotary: pairs only
    ("qwen3-ts.onnx", "qk", "a norm over the head size"),          # q/k norm, rotary
    ("albert-ts.onnx", "ov", "shared with other blocks"),
    ("gpt2-ort-past.onnx", "ov", "KV cache"),        # K and V stacked in one past tensor
    ("whisper-ort-decoder.onnx", "ov", "carries the heads out of the block"),   # MultiHeadAttention's cross cache
    ("falcon-d18.onnx", "ov", "multi-query attention"),    # one KV head, in one packed QKV projection
    ("gpt-neox-ts.onnx", "ov", "head-size positions are not known"),   # q, k, v interleaved per head
    ("torch-encoder-ts.onnx", "ov", "on an axis of their own"),     # nn.MultiheadAttention's [3, ...] stack
    ("siglip-vision-ts.onnx", "ov", "on an axis of their own"),   # its pooling head: k/v stacked, as torch packs them
])
def test_what_a_cut_inside_the_heads_cannot_pass_is_refused(name, circuit, words):
    state, options = matched(name)
    rng = np.random.default_rng(0)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, circuit, 2, rng),)) for b in state.blocks}
    with pytest.raises(RewriteError, match=words):
        pipeline.rewrite(replace(state, plans=plans), options)


def test_a_value_tensor_whose_head_size_was_not_followed_is_refused():
    """A V tensor on the flow whose head-size axis the matcher did not find (an op it does not follow) stops an OV
    cut, with the tensor named."""
    state, options = matched("bert-ts.onnx")
    b = state.blocks[0]
    lost = next(t for t in b.tensors if t.roles == {"v"} and not t.constant and t.dim_axis is not None)
    blocks = (replace(b, tensors=tuple(replace(t, dim_axis=None) if t is lost else t for t in b.tensors)),) + \
        state.blocks[1:]
    state = replace(state, matched=replace(state.matched, blocks=blocks))
    rng = np.random.default_rng(0)
    plans = {x.index: BlockPlan(tuple(range(x.num_heads)), dims=(random_dims(x, "ov", 2, rng),)) for x in blocks}
    with pytest.raises(RewriteError, match=f"{lost.name}.*no head-size axis that the matcher could follow"):
        pipeline.rewrite(replace(state, plans=plans), options)


@pytest.mark.parametrize("name,kw,words", [
    ("llama-genai/model.onnx", dict(v_dims=0.5), "one head size for Q, K and V"),   # GroupQueryAttention
    ("torch-encoder-d18.onnx", dict(v_dims=0.5), "on an axis of their own"),
    ("cohere-d18.onnx", dict(qk_dims=0.5), "no head-size axis known"),      # a q/k norm weight per head, [H, D]
])
def test_a_cut_the_rewrite_cannot_carry_is_refused_before_anything_is_fitted(name, kw, words):
    """The rewrite's refusals come first, in one line: no fit (weights-only here) runs on what it cannot carry."""
    with pytest.raises((PlanError, RewriteError), match=words):
        prune_model(onnx.load(str(MODELS / name)), **kw)


@pytest.mark.parametrize("name", ["bert-qdq.onnx", "llama-nbits32.onnx", "bert-dyn.onnx"])
def test_a_rotation_on_a_quantized_model_is_refused_with_the_reason(name):
    if name.startswith("bert"):         # no rotary embedding: a QK cut is a rotation
        with pytest.raises(PlanError, match="re-quantize"):
            prune_model(onnx.load(str(MODELS / name)), qk_dims=0.5)
    state, options = matched(name)       # a plan with maps reaching the rewrite is refused there too
    rng = np.random.default_rng(0)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "ov", 2, rng),)) for b in state.blocks}
    with pytest.raises(PlanError, match="re-quantize"):
        pipeline.rewrite(replace(state, plans=plans), options)


@pytest.mark.parametrize("name,kw", [
    ("bert-ts.onnx", dict(qk_dims=0.5, v_dims=0.5, compensate="auto")),
    ("bert-d18.onnx", dict(ratio=0.5, v_dims=0.25, compensate="refit")),
    ("vit-ts.onnx", dict(qk_dims=0.75, compensate="scale")),
    ("llama-gqa4-ts.onnx", dict(v_dims=0.5, compensate="auto")),       # one A per KV group of 4 query heads
    ("qwen3-d18.onnx", dict(ratio=0.25, v_dims=0.75, compensate="bias")),
])
def test_compensation_after_a_cut_is_proved_and_recovers_held_out_error(name, kw):
    """--compensate after a cut inside the heads refits the cut output projection (rank-r rows for an OV cut);
    the pruned model equals the compensated original with the maps written in, and that compensated original
    is another model than the uncompensated one. ``auto`` never does worse on the held-out batches."""
    model = onnx.load(str(MODELS / name))
    calib = synth_inputs(model, seed=2, batch=48, seq=12)
    got = prune_model(model, calib=calib, **kw)
    plain = prune_model(model, calib=calib, **{k: v for k, v in kw.items() if k != "compensate"})
    assert got.max_error is not None and got.max_error <= 1e-4
    assert got.compensate == kw["compensate"] and got.reference is not None
    feeds = synth_inputs(model, seed=9, batch=2, seq=7)
    assert max_abs_diff(run(got.model, feeds), run(plain.model, feeds)) > 1e-4
    for fit in got.fits:
        assert fit.error_after <= fit.error_before + 1e-12
    if kw["compensate"] == "auto":
        assert got.fits and any(f.error_after < f.error_before for f in got.fits)
    if kw["compensate"] in ("auto", "refit"):     # what was fitted is what the cut model computes
        part = {k: v[:16] for k, v in calib.items()}
        ref = run(model, part)
        out = next(iter(ref))

        def error(m):
            return float(np.sum((run(m, part)[out] - ref[out]) ** 2) / np.sum(ref[out] ** 2))
        assert error(got.model) < 0.5 * error(plain.model)


def test_the_proof_of_a_compensated_cut_fails_against_the_uncompensated_original():
    """Planted fault: the compensated cut checked against the original without its compensation."""
    from onnxprune.verify import reference as masked
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    calib = synth_inputs(model, seed=2, batch=32, seq=12)
    got = prune_model(model, calib=calib, qk_dims=0.5, v_dims=0.5, compensate="refit")
    state, _ = matched("bert-ts.onnx")
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=got.plans[b.index].dims) for b in state.blocks}
    wrong = masked(state.model, state.blocks, plans)
    feeds = synth_inputs(model, seed=4, batch=2, seq=9)
    assert compare(wrong, got.model, feeds, {}) > 1e-3


# ------------------------------------------------------------------ the fits
def _psd(rng, d, rank=None):
    x = rng.standard_normal((d, rank or d))
    return x @ x.T


def test_the_ov_fit_of_one_head_is_the_best_rank_r():
    """One head per KV head: the OV fit reaches the reduced-rank optimum, the tail of the singular values of
    C_z^½ G^½, and no random subspace of the same rank does better."""
    rng = np.random.default_rng(0)
    d, r = 12, 5
    cz, g = {0: _psd(rng, d)}, {0: _psd(rng, d)}
    dims = fit_ov(cz, g, ((0,),), r)
    w, v = np.linalg.eigh(cz[0])
    cs = (v * np.sqrt(w)) @ v.T
    w, v = np.linalg.eigh(g[0])
    gs = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    s = np.linalg.svd(cs @ gs, compute_uv=False)
    best = float(np.sum(s[r:] ** 2) / np.sum(s ** 2))
    assert circuit_error(dims, cz, g, ((0,),)) == pytest.approx(best, rel=1e-4)
    for seed in range(5):
        rand = HeadDims("ov", {0: np.random.default_rng(seed).standard_normal((d, r))},
                        {0: np.random.default_rng(seed + 9).standard_normal((d, r))})
        assert circuit_error(rand, cz, g, ((0,),)) > best


def test_the_qk_fit_is_exact_at_the_scores_rank_and_shared_by_a_group():
    """Keys that live in a 4-dimensional subspace: rank 4 keeps every score of both query heads of the group
    exactly (one A for the KV head), rank 3 does not."""
    rng = np.random.default_rng(1)
    d = 10
    cq = {0: _psd(rng, d), 1: _psd(rng, d)}
    ck = {0: _psd(rng, d, 4)}
    groups = ((0, 1),)
    assert circuit_error(fit_qk(cq, ck, groups, 4), cq, ck, groups) < 1e-5
    assert circuit_error(fit_qk(cq, ck, groups, 3), cq, ck, groups) > 1e-3


def test_keep_rank_is_the_floor_arithmetic_of_ratio():
    assert [keep_rank(32, r) for r in (0, 0.25, 0.5, 0.75, "0.9")] == [32, 24, 16, 8, 3]
    assert keep_rank(32, 0.99) == 1
    assert keep_rank(32, 0.75, multiple_of=16) == 16 and keep_rank(30, 0.1, multiple_of=8) == 30


def test_fitted_cuts_beat_the_weights_fallback_on_held_out_data_and_are_exact():
    """bert-ts with calibration data: the pruned model equals its projected original, and the fitted maps'
    output is closer to the original on other inputs than the weights-only fallback's."""
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    calib = synth_inputs(model, seed=3, batch=48, seq=16)
    fitted = prune_model(model, qk_dims=0.5, v_dims=0.5, calib=calib)
    weights = prune_model(model, qk_dims=0.5, v_dims=0.5)
    assert fitted.max_error <= 1e-4 and weights.max_error <= 1e-4
    assert fitted.dims_source == "calibration" and weights.dims_source == "weights"
    assert {(f.circuit, f.rank) for f in fitted.dim_fits} == {("qk", 4), ("ov", 4)}
    feeds = synth_inputs(model, seed=11, batch=4, seq=16)
    ref = run(model, feeds)
    err_fit = max_abs_diff(ref, run(fitted.model, feeds))
    err_weights = max_abs_diff(ref, run(weights.model, feeds))
    assert 0 < err_fit < err_weights


def test_options_dims_alone_keep_every_head_and_bad_shares_are_refused():
    assert PruneOptions(v_dims=0.5).ratio == 0
    with pytest.raises(PlanError, match="qk-dims"):
        PruneOptions(qk_dims=1.5)


def test_the_cli_cuts_dims_and_reports_ranks_and_the_cache(tmp_path):
    out, report = tmp_path / "cut.onnx", tmp_path / "r.json"
    proc = cli(MODELS / "llama-gqa4-ts.onnx", "--v-dims", "0.5", "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "QK" in proc.stdout and "the weights alone" in proc.stdout
    rep = json.loads(report.read_text())
    b = rep["blocks"][0]
    assert (b["qk_rank"], b["ov_rank"]) == (b["head_dim"], b["head_dim"] // 2)
    kv = rep["kv_cache_bytes_per_token"]
    assert kv["after"] * 4 == kv["before"] * 3          # V at half its size, K as it was
    assert "KV cache per token" in proc.stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_multi_query_v_dims_shrink_the_one_kv_heads_projection_and_cache(tmp_path):
    """Gemma 3 270M's form (one KV head for four query heads): --v-dims 0.5 halves its V projection's columns
    and the V part of the KV cache per token; K stays whole (q/k norms and rotary)."""
    out, report = tmp_path / "cut.onnx", tmp_path / "r.json"
    proc = cli(MODELS / "gemma3-mqa-d18.onnx", "--v-dims", "0.5", "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    kv = rep["kv_cache_bytes_per_token"]
    assert kv["after"] * 4 == kv["before"] * 3
    state, _ = matched("gemma3-mqa-d18.onnx")
    v = state.blocks[0].projection("v")
    widths = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert widths[v.weight][v.head_axis] == state.blocks[0].head_dim // 2


# ------------------------------------------------------------------ the attention budget
def test_the_budget_removes_its_share_of_the_attention_macs_where_the_loss_is_least():
    """--attention-ratio 0.5 on bert-ts: the ranks it keeps remove at least half of every circuit dimension
    of the model (each costs the same MACs here), the cut is exact, and the counted attention MACs fall by at
    least that much; a block whose outputs are cheap to cut loses more there than uniform ranks would."""
    from onnxprune.api import count_result_macs
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    calib = synth_inputs(model, seed=3, batch=64, seq=16)
    r = prune_model(model, attention_ratio=0.5, calib=calib)
    assert r.max_error <= 1e-4
    blocks = r.blocks
    full = sum(2 * b.head_dim for b in blocks)
    kept = sum(b.head_dim for b in blocks for _ in ("qk", "ov")) - sum(b.head_dim - f.rank for f in r.dim_fits
                                                                      for b in blocks if b.index == f.block)
    assert kept <= full / 2
    counted = count_result_macs(model, r, seq=16)
    before = sum(counted.macs[0].blocks.values())
    after = sum(counted.macs[1].blocks.values())
    assert after <= 0.5 * before + 1e-9 * before
    ranks = {(f.block, f.circuit): f.rank for f in r.dim_fits}
    assert len(set(ranks.values())) > 1 or len(ranks) < 2 * len(blocks)     # not one uniform rank everywhere


def test_the_budget_drops_a_head_that_gives_nothing_and_compensates_unless_told_not_to():
    """A head whose output rows are zero costs nothing to drop: the budget drops it (a head is one of its
    steps), and the cut is exact. The budget compensates (auto) by default; ``--compensate none`` turns it off."""
    from onnx import numpy_helper
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    state, _ = matched("bert-ts.onnx")
    b = state.blocks[1]
    o = next(i for i in model.graph.initializer if i.name == b.o_proj.weight)
    w = numpy_helper.to_array(o).copy()
    np.moveaxis(w, b.o_proj.head_axis, 0)[:b.head_dim * 2] = 0       # heads 0 and 1 write nothing
    o.CopyFrom(numpy_helper.from_array(w, o.name))
    calib = synth_inputs(model, seed=3, batch=64, seq=16)
    r = prune_model(model, attention_ratio=0.25, calib=calib)
    assert r.max_error <= 1e-4
    assert 0 not in r.kept[1] and 1 not in r.kept[1]
    assert r.compensate == "auto" and r.reference is not None
    off = prune_model(model, attention_ratio=0.25, calib=calib, compensate="none")
    assert off.compensate is None and off.reference is None and off.max_error <= 1e-4


def test_the_budget_drops_a_whole_kv_group_that_gives_nothing():
    """With grouped KV heads a step may drop one whole KV group (its KV head and all its query heads: the rectangle
    the rewrite needs). Planted on a 16-head block on 4 KV groups: the output rows of group 2's four query heads
    zero. The budget drops exactly that group there (no group would go with the rows intact: the cheapest cuts
    are ranks), keeps three KV heads, and the cut is exact; whole heads alone are priced too."""
    from onnx import numpy_helper
    model = onnx.load(str(MODELS / "llama-gqa4-ts.onnx"))
    state, _ = matched("llama-gqa4-ts.onnx")
    b = state.blocks[0]
    assert b.num_heads == 16 and len(b.kv_groups) == 4
    calib = synth_inputs(model, seed=2, batch=16, seq=12)
    honest = prune_model(model, attention_ratio=0.25, calib=calib)
    assert all(len(c.heads) == 16 for c in honest.budget.choices)
    group = list(b.kv_groups[2])
    o = next(i for i in model.graph.initializer if i.name == b.o_proj.weight)
    w = numpy_helper.to_array(o).copy()
    rows = np.moveaxis(w, b.o_proj.head_axis, 0)
    for h in group:
        rows[h * b.head_dim:(h + 1) * b.head_dim] = 0
    o.CopyFrom(numpy_helper.from_array(w, o.name))
    r = prune_model(model, attention_ratio=0.25, calib=calib)
    assert r.max_error is not None and r.max_error <= 1e-4
    assert r.kept[0] == tuple(h for h in range(16) if h not in group)
    assert b.kept_kv_heads(r.kept[0]) == [0, 1, 3]
    assert r.budget.heads_loss is not None


def test_the_budget_prices_a_cut_with_its_mean_put_back():
    """A head whose context is a constant (its V weight zero, its V bias not) writes one fixed vector: dropped with
    that vector put into the output bias, it costs nothing, and the budget drops it (without the shift it
    would cost the whole vector)."""
    from onnx import numpy_helper
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    state, _ = matched("bert-ts.onnx")
    b = state.blocks[1]
    v = b.projection("v")
    assert v.bias is not None
    init = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(init[v.weight]).copy()
    np.moveaxis(w, v.head_axis, 0)[b.head_dim * 2:b.head_dim * 3] = 0           # head 2 reads nothing
    init[v.weight].CopyFrom(numpy_helper.from_array(w, v.weight))
    bias = numpy_helper.to_array(init[v.bias]).copy()
    bias[b.head_dim * 2:b.head_dim * 3] = 3.0
    init[v.bias].CopyFrom(numpy_helper.from_array(bias, v.bias))
    calib = synth_inputs(model, seed=3, batch=64, seq=16)
    r = prune_model(model, attention_ratio=0.15, calib=calib)
    assert r.max_error <= 1e-4
    assert 2 not in r.kept[1]


def test_the_budget_prices_its_plan_whole_and_takes_heads_where_blocks_cuts_do_not_add_up(monkeypatch):
    """The greedy steps price each block alone; the plan is priced again with every block cut at once, against
    whole heads alone at the same MACs. Planted: cuts inside the heads of two blocks that, together (and only
    together), spoil the outputs; the budget then takes whole heads, says so, and is still exact."""
    from onnxprune.calibration.session import Calibrator
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    state, _ = matched("bert-ts.onnx")
    calib = synth_inputs(model, seed=3, batch=64, seq=16)
    honest = prune_model(model, attention_ratio=0.5, calib=calib)
    assert honest.budget.chosen == "mixed" and honest.budget.loss < honest.budget.heads_loss
    assert build_report(honest, "m", None, 0)["budget"]["whole_heads_loss"] == honest.budget.heads_loss

    inside = {b.index: {t.name for c in ("qk", "ov") for t in written(b, c)} - {b.o_proj.weight}
              for b in state.blocks}
    run_ = Calibrator.run

    def run(self, feeds, weights=None, contexts=False):
        got = run_(self, feeds, weights, contexts)
        if sum(bool(inside[i] & set(weights or {})) for i in inside) > 1:     # two blocks cut inside at once
            got = {n: v + 1.0 if v.dtype.kind == "f" else v for n, v in got.items()}
        return got

    monkeypatch.setattr(Calibrator, "run", run)
    r = prune_model(model, attention_ratio=0.5, calib=calib)
    assert r.budget.chosen == "heads" and r.budget.heads_loss < honest.budget.heads_loss * 10
    assert all(len(k) == 2 for k in r.kept.values())       # half of each block's 4 heads
    assert not r.dim_fits and r.max_error <= 1e-4
    assert "by whole heads alone" in format_table(build_report(r, "m", None, 0))


def test_the_budget_prices_its_candidates_as_compensated(monkeypatch):
    """With ``--compensate`` (the budget's default) both candidates are priced after the compensation that
    follows, fitted on the batches not held out: planted, a compensation that spoils every cut inside the heads
    (and only those) makes the budget take whole heads, which it would not take priced before compensation."""
    from onnxprune import budget
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    calib = synth_inputs(model, seed=3, batch=64, seq=16)
    honest = prune_model(model, attention_ratio=0.5, calib=calib)
    assert honest.budget.compensated == "auto" and honest.budget.chosen == "mixed"
    assert build_report(honest, "m", None, 0)["budget"]["compensated"] == "auto"
    plain = prune_model(model, attention_ratio=0.5, calib=calib, compensate="none")
    assert plain.budget.compensated is None and plain.budget.chosen == "mixed"
    real, seen = budget.compensation, []

    def spoiled(cal, kept, mode, dims=None, cut=None, **kw):
        new = real(cal, kept, mode, dims=dims, cut=cut, **kw)
        seen.append((len(cal.data), bool(dims)))
        return {n: v * 3 for n, v in new.items()} if dims else new

    monkeypatch.setattr(budget, "compensation", spoiled)
    r = prune_model(model, attention_ratio=0.5, calib=calib)
    assert r.budget.chosen == "heads" and r.budget.loss == r.budget.heads_loss
    assert all(len(k) == 2 for k in r.kept.values()) and not r.dim_fits and r.max_error <= 1e-4
    assert sorted(seen) == [(3, False), (3, True)]     # 64 samples in 4 batches of 16, one held out


@pytest.mark.parametrize("kw,words", [
    (dict(attention_ratio=0.5), "give --calib"),
    (dict(attention_ratio=0.5, v_dims=0.5, calib={}), "without --qk-dims/--v-dims"),
    (dict(attention_ratio=0.5, ratio=0.25, calib={}), "without --ratio"),
])
def test_the_budget_refuses_what_it_cannot_combine(kw, words):
    with pytest.raises(PlanError, match=words):
        PruneOptions(**kw)
