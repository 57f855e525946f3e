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


def test_a_genai_folder_cut_inside_its_heads_generates_what_the_projected_original_does(tmp_path):
    """GroupQueryAttention with its RoPE inside and a packed QKV (heads of 32): --qk-dims 0.5 --v-dims 0.5 keeps
    whole rotary pairs and 16 of V, the cos/sin caches keep the pairs, genai_config says head_size 16 (the cache
    that onnxruntime-genai allocates, whose declared size is symbolic), and onnxruntime-genai generates from the
    pruned folder exactly the tokens it generates from the original with the maps written in."""
    import json
    import shutil
    from onnxprune import prune_model
    from onnxprune.model.save import save_model_atomic
    from onnxprune.verify import reference
    from conftest import MODELS, cli
    src = MODELS / "llama-genai-d32"
    out = tmp_path / "pruned"
    out.mkdir()
    model = onnx.load(str(src / "model.onnx"))
    res = cli(str(src / "model.onnx"), "--qk-dims", "0.5", "--v-dims", "0.5", "-o", f"{out}/")
    assert res.returncode == 0, res.stderr
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["head_size"] == 16 and decoder["num_attention_heads"] == 4
    r = prune_model(model, qk_dims=0.5, v_dims=0.5)
    assert {(f.circuit, f.rank) for f in r.dim_fits} == {("qk", 16), ("ov", 16)}
    cos = [n for n in r.model.graph.node if n.op_type == "Gather" and "cos_cache" in n.input[0]]
    assert cos and all(n.input[0] == "cos_cache" for n in cos)
    ref = tmp_path / "projected"
    shutil.copytree(src, ref)
    (ref / "model.onnx").unlink()
    (ref / "model.onnx.data").unlink()
    save_model_atomic(reference(model, r.blocks, r.plans), ref / "model.onnx", external=True)
    expected = _genai_generate(ref)
    assert _genai_generate(out) == expected and len(expected) == 17
    assert expected != _genai_generate(src)        # the cut changes what the model says


@pytest.mark.parametrize("kw,words", [
    (dict(v_dims=0.5), "one head size for Q, K"),
    (dict(attention_ratio=0.5), "one head size for Q, K"),
])
def test_group_query_attention_needs_both_circuits_at_one_rank(kw, words):
    from onnxprune import prune_model
    from onnxprune.errors import PlanError, RewriteError
    from onnxprune.inputs import synth_inputs
    from conftest import MODELS
    model = onnx.load(str(MODELS / "llama-genai-d32" / "model.onnx"))
    if "attention_ratio" in kw:
        kw = {**kw, "calib": synth_inputs(model, seed=1, batch=2, seq=8)}
    with pytest.raises((PlanError, RewriteError), match=words):
        prune_model(model, **kw)


def test_the_int4_genai_folder_refuses_a_cut_that_would_requantize():
    from onnxprune import prune_model
    from onnxprune.errors import PlanError
    from conftest import MODELS
    with pytest.raises(PlanError, match="re-quantize"):
        prune_model(onnx.load(str(MODELS / "llama-genai-int4" / "model.onnx")), qk_dims=0.5, v_dims=0.5)
