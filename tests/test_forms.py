"""Graph forms that no exporter in models/ writes, built with onnx.helper: each still has to prune exactly."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import prune_model


def _mask_repeated_per_head(heads=4, d=4, seq=5, distinct=False):
    """Softmax(QK^T + Concat([mask] * H, axis=1)) V: a mask replicated once per head, as some fusions write
    (``distinct``: a different bias per head, so that keeping the wrong pieces would show)."""
    rng = np.random.default_rng(0)
    f = heads * d
    inits = [numpy_helper.from_array(rng.standard_normal((f, f)).astype(np.float32), n) for n in "qkvo"]
    masks = [f"mask{h}" if distinct else "mask" for h in range(heads)]
    inits += [numpy_helper.from_array(rng.standard_normal((1, 1, seq, seq)).astype(np.float32), m)
              for m in sorted(set(masks))]
    inits += [
              numpy_helper.from_array(np.array([0, 0, heads, d], np.int64), "split"),
              numpy_helper.from_array(np.array([0, 0, f], np.int64), "merge")]
    nodes = []
    for r in "qkv":
        nodes += [helper.make_node("MatMul", ["x", r], [f"{r}p"]),
                  helper.make_node("Reshape", [f"{r}p", "split"], [f"{r}4"]),
                  helper.make_node("Transpose", [f"{r}4"], [f"{r}t"], perm=[0, 2, 3, 1] if r == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["s"]),
              helper.make_node("Concat", masks, ["masks"], axis=1, name="mask_per_head"),
              helper.make_node("Add", ["s", "masks"], ["sm"]),
              helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["c"]),
              helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merge"], ["cm"]),
              helper.make_node("MatMul", ["cm", "o"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, f])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("distinct", [False, True])
def test_a_mask_concatenated_per_head_shrinks_with_the_heads(distinct):
    model = _mask_repeated_per_head(distinct=distinct)
    for kept in ({0: (1, 3)}, {0: (0,)}, {0: (0, 1, 2)}):
        result = prune_model(model, kept=kept)
        assert result.max_error <= 1e-5, (kept, result.max_error)
        concat = next(n for n in result.model.graph.node if n.op_type == "Concat")
        assert len(concat.input) == len(kept[0])
        if distinct:
            assert list(concat.input) == [f"mask{h}" for h in kept[0]]


def _onnx_attention_3d(heads=8, kv_heads=2, d=8, seq=5):
    """The ONNX Attention op (opset 23) in its 3-D form: Q [B, S, H*D], K/V [B, S, Hkv*D], with the head
    counts in q_num_heads / kv_num_heads."""
    rng = np.random.default_rng(1)
    hidden = 32
    shapes = {"q": (hidden, heads * d), "k": (hidden, kv_heads * d), "v": (hidden, kv_heads * d),
              "o": (heads * d, hidden)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("MatMul", ["x", r], [f"{r}p"]) for r in "qkv"]
    nodes += [helper.make_node("Attention", ["qp", "kp", "vp"], ["c"], q_num_heads=heads, kv_num_heads=kv_heads),
              helper.make_node("MatMul", ["c", "o"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_onnx_attention_3d_form():
    model = _onnx_attention_3d()
    for gqa, heads, kv in (("uniform", 4, 2), ("group", 4, 1)):
        result = prune_model(model, 0.5, gqa=gqa)
        assert result.max_error <= 1e-5, (gqa, result.max_error)
        attrs = {a.name: a.i for n in result.model.graph.node if n.op_type == "Attention" for a in n.attribute}
        assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (heads, kv)
