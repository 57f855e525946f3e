"""A cut as a linear map (cut.py): keeping heads is a selection, and a map inside the heads (a d x r matrix on
the head-size axis of V, and the matching rows of the output projection) is applied by the same rewriter;
the result equals the original with that map's projection written into its weights."""

from dataclasses import replace

import numpy as np
import pytest

from onnxprune import pipeline
from onnxprune.cut import AxisMap, HeadDims, merged_map
from onnxprune.errors import PlanError, RewriteError
from onnxprune.inputs import synth_inputs
from onnxprune.plan import BlockPlan
from onnxprune.verify import compare, max_abs_diff, reference, run

from conftest import matched, random_dims


def test_a_selection_is_a_matrix_of_ones():
    x = np.random.default_rng(0).standard_normal((3, 8, 2))
    m = AxisMap.select([1, 4, 5])
    assert np.array_equal(m.apply(x, 1), np.take(x, [1, 4, 5], axis=1))
    dense = m.matrix(8)
    assert dense.shape == (8, 3) and dense.sum() == 3
    assert np.allclose(np.einsum("aib,ij->ajb", x, dense), m.apply(x, 1))


def test_a_merged_map_is_block_diagonal():
    """Heads 0 and 2 of 3 (D = 2) kept, each times its own [2, 1] matrix; position 6 belongs to no head."""
    owner = np.array([0, 0, 1, 1, 2, 2, -1])
    mats = {0: np.array([[1.0], [2.0]]), 2: np.array([[3.0], [-1.0]])}
    m = merged_map(owner, {0, 2}, mats.__getitem__)
    assert m.new_size == 3 and not m.is_selection
    x = np.arange(14, dtype=np.float64).reshape(2, 7)
    dense = m.matrix(7)
    assert np.allclose(x @ dense, m.apply(x, 1))
    assert np.allclose(m.apply(x, 1)[:, 0], x[:, 0] + 2 * x[:, 1])
    assert np.allclose(m.apply(x, 1)[:, 2], x[:, 6])


def _cut(state, options, kept, rank, seed=0):
    plans = {b.index: BlockPlan(tuple(kept), dims=(random_dims(b, "ov", rank, np.random.default_rng(seed + b.index)),))
             for b in state.blocks}
    state = replace(state, plans=plans)
    return pipeline.verify(pipeline.rewrite(state, options), options)


@pytest.mark.parametrize("name", ["bert-ts.onnx", "bert-d18.onnx", "llama-ts.onnx", "llama-gqa4-d18.onnx"])
@pytest.mark.parametrize("rank,kept", [(5, None), (3, "some"), (8, None)])
def test_a_map_inside_the_heads_equals_its_projection_written_into_the_weights(name, rank, kept):
    """Random d x r maps on V's head-size axis (one per KV head) and the output projection's rows (one per
    query head), with all or some heads kept: the pruned model (full checker, strict shape inference) equals
    the original with W_o,h <- A B^T W_o,h, also at other batch sizes and lengths."""
    state, options = matched(name)
    block = state.blocks[0]
    heads = tuple(range(block.num_heads))
    if kept == "some":     # whole KV groups, so that GQA stays valid
        heads = tuple(h for g in block.kv_groups[::2] for h in g)
    cut = _cut(state, options, heads, rank)
    assert cut.max_error is not None and cut.max_error <= 1e-4
    v = block.projection("v")
    widths = {i.name: list(i.dims) for i in cut.pruned.graph.initializer}
    assert widths[v.weight][v.head_axis] == len(block.kept_kv_heads(heads)) * rank
    ref = reference(state.model, state.blocks, cut.plans)
    feeds = synth_inputs(state.model, seed=4, batch=3, seq=7)
    assert compare(ref, cut.pruned, feeds, {}) <= 1e-4
    # the projection really changes the model: the reference is not the original (nor the plain mask)
    assert max_abs_diff(run(state.model, feeds), run(ref, feeds)) > 1e-3


def test_a_selection_map_inside_the_heads_is_the_plain_cut():
    """The identity's columns as A = B: keeping head-size positions 0..7 of 8 changes nothing."""
    state, options = matched("bert-ts.onnx")
    eye = {i: np.eye(8, dtype=np.float32) for i in range(4)}
    plans = {b.index: BlockPlan((0, 1, 2, 3), dims=(HeadDims("ov", eye, eye),)) for b in state.blocks}
    cut = pipeline.verify(pipeline.rewrite(replace(state, plans=plans), options), options)
    feeds = synth_inputs(state.model)
    assert max_abs_diff(run(state.model, feeds), run(cut.pruned, feeds)) <= 1e-5


@pytest.mark.parametrize("name,words", [
    ("torch-encoder-ts.onnx", "on an axis of their own"),     # nn.MultiheadAttention stacks q, k and v
    ("gpt2-ort-past.onnx", "KV cache"),                        # K and V stacked in one past tensor
])
def test_what_a_map_inside_the_heads_cannot_be_written_into_is_refused(name, words):
    state, options = matched(name)
    with pytest.raises(RewriteError, match=words):
        _cut(state, options, range(state.blocks[0].num_heads), 4)


def test_a_fused_attention_op_not_known_to_take_a_cut_inside_its_heads_is_refused(monkeypatch):
    """Planted: MultiHeadAttention taken off the list of fused ops whose head sizes the rewrite knows (as a fused
    op none has checked would be): refused in one line, naming the op."""
    from onnxprune.rewrite import rewriter
    monkeypatch.setattr(rewriter, "FUSED_DIMS", tuple(o for o in rewriter.FUSED_DIMS if o != rewriter.MHA))
    state, options = matched("bert-ort-mha.onnx")
    with pytest.raises(RewriteError, match=r"fused attention op \(MultiHeadAttention"):
        _cut(state, options, range(state.blocks[0].num_heads), 4)


def test_an_unknown_circuit_is_refused():
    state, options = matched("bert-ts.onnx")
    b = state.blocks[0]
    dims = random_dims(b, "sv", 4, np.random.default_rng(0))
    plans = {x.index: BlockPlan(tuple(range(x.num_heads)), dims=(dims,)) for x in state.blocks}
    with pytest.raises(PlanError, match="circuit 'sv'"):
        pipeline.rewrite(replace(state, plans=plans), options)


def test_a_rewrite_site_kind_registered_twice_is_refused():
    from onnxprune.rewrite import sites
    with pytest.raises(ValueError, match="'reshape' is registered twice"):
        sites.site("reshape")(lambda *a: None)
