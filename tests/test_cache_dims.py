"""Cuts inside the heads of a model with a KV cache in and out (issue 22): the cache's head size shrinks with K
and V, its declared shapes change, and the proof maps the reference's cache the same way (K and V of each KV
head times its ``A``), on a prompt and on a decode step over a filled past."""

from dataclasses import replace

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.cut import HeadDims, HeadwiseMap
from onnxprune.errors import VerifyError
from onnxprune.plan import BlockPlan

from conftest import matched, random_dims

# Llama (GQA, rotary), Qwen3 (q/k norms: V only), Gemma 3 (one KV head above the broadcast, q/k norms)
PAST = ["optimum-llama-past.onnx", "optimum-qwen3-past.onnx", "optimum-gemma3-past.onnx"]


def _cut(state, options, plans):
    return pipeline.verify(pipeline.rewrite(replace(state, plans=plans), options), options)


def _dims(block, rng, qk: bool):
    out = [random_dims(block, "ov", 3, rng)]
    if qk:      # whole rotary pairs
        keep = sorted(i for p in block.pairs[::2] for i in p)
        out.append(HeadDims.select("qk", block.head_dim, keep, block.num_kv_heads, block.num_heads))
    return tuple(out)


def _declared(model, name):
    vi = next(v for v in list(model.graph.input) + list(model.graph.output) if v.name == name)
    return [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", PAST)
@pytest.mark.parametrize("some", [False, True])
def test_a_cut_with_a_kv_cache_equals_the_projected_original_on_a_filled_past(name, some):
    """Random V maps and whole rotary pairs of QK (below the q/k norms of Qwen3 and Gemma 3), heads dropped or
    not: proved on the prompt and on
    a decode step over a past of 3 (``pipeline.verification_feeds``), the past mapped for the pruned model and
    its presents set against the mapped reference; the cache inputs and outputs declare the new head size."""
    state, options = matched(name)
    rng = np.random.default_rng(5)
    plans = {}
    for b in state.blocks:
        heads = tuple(h for g in b.kv_groups[: max(1, len(b.kv_groups) // 2)] for h in g) if some \
            else tuple(range(b.num_heads))
        plans[b.index] = BlockPlan(heads, dims=_dims(b, rng, qk=True))
    cut = _cut(state, options, plans)
    assert cut.max_error is not None and cut.max_error <= 1e-4
    maps = {n: m for n, axes in cut.io_keep.items() for m in axes.values() if isinstance(m, HeadwiseMap)}
    assert any("value" in n for n in maps)
    assert _declared(cut.pruned, "past_key_values.0.value")[-1] == 3
    assert _declared(cut.pruned, "present.0.value")[-1] == 3
    assert _declared(cut.pruned, "past_key_values.0.key")[-1] == len(plans[0].dims[1].keep)    # after RoPE


def test_a_past_fed_without_its_map_fails_the_proof(monkeypatch):
    """Planted fault: the pruned model's past V is the reference's first r positions, not ``v A``: the decode
    step over that past differs."""
    from onnxprune import verify
    state, options = matched("optimum-llama-past.onnx")
    rng = np.random.default_rng(2)
    plans = {b.index: BlockPlan(tuple(range(b.num_heads)), dims=(random_dims(b, "ov", 3, rng),)) for b in state.blocks}
    real = verify.kept_heads_only

    def unmapped(arrays, io_keep):
        plain = {n: {ax: (np.arange(m.matrices[0].shape[1]) if isinstance(m, HeadwiseMap) else m)
                     for ax, m in axes.items()} for n, axes in io_keep.items()}
        return real(arrays, plain)
    monkeypatch.setattr(verify, "kept_heads_only", unmapped)
    with pytest.raises(VerifyError, match="differs"):
        _cut(state, options, plans)


def test_the_cli_cuts_an_optimum_past_model_and_its_cache(tmp_path):
    """--v-dims on an Optimum export with past: the report's KV cache per token shrinks, and the pruned model
    runs a decode step with a cache of the new size."""
    import json
    from onnxprune.inputs import synth_inputs
    from conftest import MODELS, cli
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    res = cli(str(MODELS / "optimum-llama-past.onnx"), "--v-dims", "0.5", "-o", str(out), "--report", str(rep))
    assert res.returncode == 0, res.stderr
    kv = json.loads(rep.read_text())["kv_cache_bytes_per_token"]
    assert kv["after"] < kv["before"]
    import onnxruntime as ort
    model = onnx.load(str(out))
    feeds = synth_inputs(model, seed=1, batch=1, seq=1, past=4)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert outs["present.0.value"].shape[-1] == _declared(model, "present.0.value")[-1] < 16


# ---------------------------------------------------------------- ORT GenAI folders (GroupQueryAttention)
def _genai_generate(folder):
    pytest.importorskip("onnxruntime_genai")
    from conftest import genai_generate
    return genai_generate(folder)


@pytest.mark.parametrize("folder", ["llama-genai-d32", "gemma3-genai"])
def test_a_genai_folder_cut_inside_its_heads_generates_what_the_projected_original_does(tmp_path, folder):
    """GroupQueryAttention with its RoPE inside and a packed QKV (heads of 32; Gemma 3's of 64): --qk-dims 0.5
    --v-dims 0.5 keeps half the rotary pairs and half of V, the cos/sin caches keep the pairs, genai_config says
    the new head_size (the cache
    that onnxruntime-genai allocates, whose declared size is symbolic), and onnxruntime-genai generates from the
    pruned folder exactly the tokens it generates from the original with the maps written in. Gemma 3's folder
    has one KV head (its K and V runs in the packed weight found through the Split), q/k norms fused as
    SimplifiedLayerNormalization over [B, S*H, D] (their epsilon x D/r, their weight's kept positions x sqrt(D/r))
    and a sliding window: its KV cache halves."""
    import json
    import shutil
    from onnxprune import prune_model
    from onnxprune.model.save import save_model_atomic
    from onnxprune.verify import reference
    from conftest import MODELS, cli
    src = MODELS / folder
    out = tmp_path / "pruned"
    out.mkdir()
    model = onnx.load(str(src / "model.onnx"))
    res = cli(str(src / "model.onnx"), "--qk-dims", "0.5", "--v-dims", "0.5", "-o", f"{out}/")
    assert res.returncode == 0, res.stderr
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    d = json.loads((src / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    assert decoder["head_size"] == d // 2 and decoder["num_attention_heads"] == 4
    r = prune_model(model, qk_dims=0.5, v_dims=0.5)
    assert {(f.circuit, f.rank) for f in r.dim_fits} == {("qk", d // 2), ("ov", d // 2)}
    cos = [n for n in r.model.graph.node if n.op_type == "Gather" and "cos_cache" in n.input[0]]
    assert cos and all(n.input[0].startswith("cos_cache") and "__" not in n.input[0] for n in cos)
    norms = [n for n in r.model.graph.node if n.op_type == "SimplifiedLayerNormalization" and "_norm/" in n.name]
    before = {n.name: n for n in model.graph.node}
    for n in norms:         # the q/k norms: epsilon x D / r (2), their weight of r
        eps = {a.name: a.f for a in n.attribute}["epsilon"]
        assert eps == pytest.approx(2 * {a.name: a.f for a in before[n.name].attribute}["epsilon"])
    assert len(norms) == (4 if folder == "gemma3-genai" else 0)
    ref = tmp_path / "projected"
    shutil.copytree(src, ref)
    (ref / "model.onnx").unlink()
    (ref / "model.onnx.data").unlink()
    save_model_atomic(reference(model, r.blocks, r.plans), ref / "model.onnx", external=True)
    expected = _genai_generate(ref)
    assert _genai_generate(out) == expected and len(expected) == 17
    assert expected != _genai_generate(src)        # the cut changes what the model says


def test_group_query_attention_needs_both_circuits_at_one_rank():
    from onnxprune import prune_model
    from onnxprune.errors import PlanError, RewriteError
    from conftest import MODELS
    model = onnx.load(str(MODELS / "llama-genai-d32" / "model.onnx"))
    with pytest.raises((PlanError, RewriteError), match="one head size for Q, K"):
        prune_model(model, v_dims=0.5)


@pytest.mark.parametrize("folder", ["llama-genai-d32", "gemma3-genai"])
def test_group_query_attention_ranks_are_multiples_of_16_and_the_budget_steps_both_circuits(folder):
    """onnxruntime's CPU GroupQueryAttention takes head sizes that are multiples of 16: --qk-dims/--v-dims round
    the rank up to one (Gemma 3's 64 x 0.6 = 38 -> 48; Llama's 32 x 0.7 = 22 -> 32, no cut), and the budget
    lowers QK and OV together by such steps (or drops heads); every plan is proved."""
    from onnxprune import prune_model
    from onnxprune.inputs import synth_inputs
    from conftest import MODELS
    model = onnx.load(str(MODELS / folder / "model.onnx"))
    d = 64 if folder == "gemma3-genai" else 32
    r = prune_model(model, qk_dims=0.4, v_dims=0.4)
    assert {(f.circuit, f.rank) for f in r.dim_fits} == ({("qk", 48), ("ov", 48)} if d == 64 else set())
    calib = synth_inputs(model, seed=2, batch=8, seq=12)
    r = prune_model(model, attention_ratio=0.25, calib=calib)
    assert r.max_error is not None and r.max_error <= 1e-4
    for c in r.budget.choices:
        assert c.ranks["qk"] == c.ranks["ov"] and c.ranks["qk"] % 16 == 0, c
    assert any(c.ranks["qk"] < d or len(c.heads) < 4 for c in r.budget.choices)


def test_an_int4_genai_folder_cut_inside_its_heads_stays_int4_and_generates_what_its_reference_does(tmp_path):
    """GenAI's Gemma 3 in int4 (MatMulNBits, blocks of 32 rows over heads of 64): QK keeps whole rotary pairs
    through the fused q/k norms and OV whole positions, both at one rank; every projection stays MatMulNBits (the
    output projection's rows re-packed into blocks of 16 where the kept ones do not fill blocks of 32), the KV
    cache halves, and onnxruntime-genai generates exactly what the quantized reference does (the dropped queries,
    keys and context positions zeroed), which is not what the original does. Heads of 16 in blocks of 32 (the
    Llama int4 folder) leave no rank to cut: it is rounded up to the whole head."""
    import json
    import shutil
    from onnxprune import prune_model
    from onnxprune.model.save import save_model_atomic
    from onnxprune.quant import float_view
    from onnxprune.verify import reference
    from conftest import MODELS, cli
    src = MODELS / "gemma3-genai-int4"
    out = tmp_path / "pruned"
    out.mkdir()
    res = cli(str(src / "model.onnx"), "--qk-dims", "0.5", "--v-dims", "0.5", "-o", f"{out}/")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["head_size"] == 32
    model = onnx.load(str(src / "model.onnx"))
    r = prune_model(model, qk_dims=0.5, v_dims=0.5)
    assert {(f.circuit, f.rank) for f in r.dim_fits} == {("qk", 32), ("ov", 32)}
    ops = {n.op_type for n in r.model.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    view, qv = float_view(model)
    ref = tmp_path / "reference"
    shutil.copytree(src, ref)
    (ref / "model.onnx").unlink()
    (ref / "model.onnx.data").unlink()
    save_model_atomic(reference(view, r.blocks, r.plans, qv), ref / "model.onnx", external=True)
    expected = _genai_generate(ref)
    assert _genai_generate(out) == expected and expected != _genai_generate(src)
    assert not prune_model(onnx.load(str(MODELS / "llama-genai-int4" / "model.onnx")), qk_dims=0.5,
                           v_dims=0.5).dim_fits


# ---------------------------------------------------------------- GenAI's Gemma 3: one KV head, fused q/k norms
def _gemma_plans(state, rank: int, seed: int, drop: bool):
    """Random whole rotary pairs (``rank`` positions) for QK and a random V map of the same rank (one head size in
    GroupQueryAttention); ``drop``: query heads 0 and 2 dropped too."""
    rng = np.random.default_rng(seed)
    plans = {}
    for b in state.blocks:
        pairs = rng.permutation(len(b.pairs))[: rank // 2]
        keep = sorted(i for p in pairs for i in b.pairs[p])
        qk = HeadDims.select("qk", b.head_dim, keep, b.num_kv_heads, b.num_heads)
        heads = (1, 3) if drop else tuple(range(b.num_heads))
        plans[b.index] = BlockPlan(heads, dims=(qk, random_dims(b, "ov", rank, rng)))
    return plans


@pytest.mark.parametrize("rank,drop", [(16, False), (32, True), (48, False), (48, True)])
def test_gemma3_genai_cut_inside_its_heads_equals_the_projected_original(rank, drop):
    """GenAI's Gemma 3 (one KV head in a packed QKV, q/k norms as fused SimplifiedLayerNormalization, a sliding
    window, local and global RoPE caches): random pairs and a random V map at several ranks, query heads dropped or
    not, proved on a prompt and on a decode step over a filled past, and at other sizes; the packed weight, the
    norms' weights and the cache all take the new head size."""
    from onnxprune.inputs import synth_inputs
    from onnxprune.verify import compare, reference, run
    state, options = matched("gemma3-genai/model.onnx")
    assert all(b.num_kv_heads == 1 and len(b.norm_means) == 2 and not b.cut_points for b in state.blocks)
    plans = _gemma_plans(state, rank, rank, drop)
    cut = _cut(state, options, plans)
    assert cut.max_error is not None and cut.max_error <= 1e-4
    ref = reference(state.model, state.blocks, cut.plans)
    for batch, seq, past in ((1, 1, 5), (3, 4, 0)):        # a decode step over a past of 5; a prompt of 3 x 4
        feeds = synth_inputs(state.model, seed=seq, batch=batch, seq=seq, past=past)
        assert compare(ref, cut.pruned, feeds, cut.io_keep) <= 1e-4, (batch, seq)
        assert np.abs(run(state.model, feeds)["logits"] - run(ref, feeds)["logits"]).max() > 1e-4
    after = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    heads = len(plans[0].kept_heads)
    assert after["model.layers.0.attn.qkv_proj.MatMul.weight"] == [128, (heads + 2) * rank]
    assert sum(1 for n in after if n.startswith("model.layers.0.attn.") and "norm" in n and after[n] == [rank]) == 2
    assert _declared(cut.pruned, "past_key_values.0.value")[-1] in (rank, "kv_cache_dim")


@pytest.mark.parametrize("fault", ["norms left as they were", "K columns of the packed weight left whole"])
def test_gemma3_genai_cut_without_its_norm_rescale_or_its_k_columns_fails_the_proof(monkeypatch, fault):
    """Planted faults: the fused q/k norms keep their epsilon and weight (they then normalize over the kept positions
    only), or the reference zeroes the dropped columns of Q but not of K in the packed [Q | K | V] weight (K's
    norm then sees what the pruned one does not)."""
    from onnxprune import cut as cutting
    from onnxprune.rewrite import rewriter
    state, options = matched("gemma3-genai/model.onnx")
    if fault == "norms left as they were":           # the kept positions of the weight, not rescaled
        monkeypatch.setattr(rewriter, "norm_rescale", lambda share: (1.0, 1.0))
    else:
        monkeypatch.setattr(cutting, "side_of", lambda roles, circuit: 1 if len(set(roles)) > 1 else
                            ({"k": 0, "q": 1}.get(next(iter(roles))) if circuit == "qk" else None))
    with pytest.raises(VerifyError, match="differs"):
        _cut(state, options, _gemma_plans(state, 32, 0, False))


def test_gemma3_genai_cut_is_fitted_from_calibration_data():
    """The moments of the one K head are read from its own run of the packed QKV output (not K and V together,
    which share its unit): --calib fits both circuits at one rank, and the fitted cut is proved."""
    from onnxprune import prune_model
    from onnxprune.inputs import synth_inputs
    from conftest import MODELS
    model = onnx.load(str(MODELS / "gemma3-genai" / "model.onnx"))
    r = prune_model(model, qk_dims=0.25, v_dims=0.25, calib=synth_inputs(model, seed=2, batch=8, seq=12))
    assert r.max_error is not None and r.max_error <= 1e-4 and r.dims_source == "calibration"
    assert {(f.circuit, f.rank) for f in r.dim_fits} == {("qk", 48), ("ov", 48)}
    assert all(0 <= f.error < 1 for f in r.dim_fits)


def test_the_budget_loss_judges_the_outputs_not_the_kv_cache():
    """The calibration session's loss reads the logits, not the presents: a sliding-window cache is a buffer whose
    unwritten entries hold whatever memory held (on Gemma 3 270M's folder: NaN losses, a budget priced on noise)."""
    from onnxprune.calibration.session import open_session
    from onnxprune.inputs import synth_inputs
    state, options = matched("gemma3-genai/model.onnx")
    cal = open_session(state.model, state.blocks, state.shapes, synth_inputs(state.model, seed=1, batch=2, seq=5),
                       None)
    assert cal.outputs == ["logits"]
    got = cal.run(cal.data[0])
    assert np.isfinite(cal.loss(got, got)) and cal.loss(got, got) == 0


def test_the_budget_on_a_genai_folder_keeps_every_layer_alike_and_the_folder_generates(tmp_path):
    """A GenAI folder's config holds one head count and one head size for all layers, so the budget written as a
    folder chooses among plans that are the same in every block (each block drops its own least useful heads):
    the folder is written, its config says what every layer keeps, and onnxruntime-genai generates from it.
    The same budget as a single model file may differ per block."""
    import json
    from onnxprune import prune_model
    from onnxprune.inputs import synth_inputs
    from onnxprune.options import PruneOptions
    from conftest import MODELS, cli
    src = MODELS / "gemma3-genai"
    model = onnx.load(str(src / "model.onnx"))
    calib = synth_inputs(model, seed=2, batch=8, seq=12)
    np.savez(tmp_path / "calib.npz", **calib)
    out = tmp_path / "pruned"
    out.mkdir()
    res = cli(str(src / "model.onnx"), "--attention-ratio", "0.5", "--calib", str(tmp_path / "calib.npz"),
              "-o", f"{out}/", "--report", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    kept = {len(b["kept_heads"]) for b in report["blocks"]}
    assert len(kept) == 1 and decoder["num_attention_heads"] == kept.pop()
    assert report["budget"]["uniform"] is True and "the same cut in every block" in res.stderr + res.stdout
    assert len(_genai_generate(out)) == 17
    r = prune_model(model, options=PruneOptions(attention_ratio=0.5, calib=calib, uniform_blocks=True))
    assert len({(len(c.heads), tuple(sorted(c.ranks.items()))) for c in r.budget.choices}) == 1
    assert r.budget.heads_loss is not None and r.budget.loss <= r.budget.heads_loss
    free = prune_model(model, options=PruneOptions(attention_ratio=0.5, calib=calib))
    assert free.max_error is not None and free.max_error <= 1e-4


def test_a_cut_of_a_quantized_model_with_its_weights_on_disk_is_fitted_from_calibration_data(monkeypatch):
    """A large quantized model's float view dequantizes its weights only when they are read (placeholders until
    then): the calibration session that fits a cut inside the heads reads them all first (GenAI's Gemma 3 270M in
    int4 failed there: "External data path does not exist: onnxprune-not-dequantized-yet")."""
    from onnxprune import prune_model, quant
    from onnxprune.inputs import synth_inputs
    from conftest import MODELS
    from onnxprune.model import dtypes
    monkeypatch.setattr(quant, "LAZY_FROM", 20000)     # its weights placeholders, as in a large model
    monkeypatch.setattr(dtypes, "STAND_IN_BYTES", 20000)     # and the probe's stand-in for it
    folder = MODELS / "gemma3-genai-int4"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    calib = synth_inputs(onnx.load(str(folder / "model.onnx")), seed=2, batch=8, seq=12)
    r = prune_model(model, qk_dims=0.5, v_dims=0.5, calib=calib, external_dir=folder)
    assert r.max_error is not None and r.max_error <= 1e-4 and r.dims_source == "calibration"


@pytest.mark.parametrize("name", ["gemma3-genai-int4/model.onnx", "llama-nbits32.onnx"])
def test_the_budget_on_a_quantized_model_keeps_its_integers(name):
    """The budget compensates by default, which would re-quantize: on a quantized model it does not (asked for,
    --compensate is still refused), its steps keep whole positions in runs of 16, and every projection stays
    quantized."""
    from collections import Counter
    from onnxprune import prune_model
    from onnxprune.errors import PlanError
    from onnxprune.inputs import synth_inputs
    from conftest import MODELS
    model = onnx.load(str(MODELS / name))
    calib = synth_inputs(model, seed=2, batch=8, seq=12)
    r = prune_model(model, attention_ratio=0.25, calib=calib)
    assert r.max_error is not None and r.max_error <= 1e-4 and r.compensate is None
    assert all(rank % 16 == 0 for c in r.budget.choices for rank in c.ranks.values())
    assert any(f.rank < r.blocks[0].head_dim for f in r.dim_fits)
    ops = lambda m: Counter(n.op_type for n in m.graph.node if n.op_type not in ("Constant", "Gather"))
    assert ops(r.model) == ops(model)
    with pytest.raises(PlanError, match="re-quantize"):
        prune_model(model, attention_ratio=0.25, calib=calib, compensate="auto")
