"""ONNX Runtime's fused attention (com.microsoft Attention / MultiHeadAttention): dtypes kept, attributes
rewritten, malformed graphs rejected with one clean error."""


import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune import OnnxPruneError, prune_model

from conftest import MODELS  # noqa: E402


def _load(name):
    return onnx.load(str(MODELS / name))


def _fused_nodes(model):
    return [n for n in model.graph.node if n.domain == "com.microsoft" and
            n.op_type in ("Attention", "MultiHeadAttention")]


@pytest.mark.parametrize("name", ["bert-ort-attention.onnx", "bert-ort-mha.onnx", "clip-vision-ort-attention.onnx"])
def test_num_heads_follow_the_plan(name):
    result = prune_model(_load(name), kept={0: (0, 2, 3), 1: (1,)})
    heads = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "num_heads"))
             for n in _fused_nodes(result.model)]
    assert heads == [3, 1]
    assert result.max_error <= 1e-4


def test_fp16_weights_stay_fp16():
    model = _load("bert-ort-attention-fp16.onnx")
    result = prune_model(model, 0.5)
    before = {i.name: i.data_type for i in model.graph.initializer}
    after = {i.name: i for i in result.model.graph.initializer}
    sliced = {t.name for b in result.blocks for t in b.tensors if t.constant}
    assert sliced and all(after[n].data_type == before[n] == onnx.TensorProto.FLOAT16 for n in sliced if n in after)
    qkv = numpy_helper.to_array(after["Attention_0_qkv_weight"])
    assert qkv.dtype == np.float16 and qkv.shape == (32, 48)


def test_an_fp16_model_is_proved_relative_to_its_outputs():
    """fp16 rounds every sum to 11 bits, so removing heads instead of zeroing them can move an output of 30 by a
    unit of its last place, 0.0156, past the absolute 1e-2 (a 1.5 GB fp16 decoder failed its proof so): an fp16
    model is compared relative to each output's largest magnitude above 1, as a cut inside the heads is, and the
    summary says so. A wrong head is still far off."""
    from onnxprune.pipeline import relative_proof
    from onnxprune.report import build_report, format_table
    from onnxprune.verify import max_abs_diff
    ref, got = {"y": np.array([32.0, 1.0], np.float16)}, {"y": np.array([32.03125, 1.0], np.float16)}
    assert max_abs_diff(ref, got) > 1e-2 and max_abs_diff(ref, got, scaled=True) < 1e-3
    assert max_abs_diff(ref, {"y": np.array([32.0, 2.0], np.float16)}, scaled=True) > 1e-2
    model = _load("bert-ort-attention-fp16.onnx")
    assert relative_proof(model, {}) and not relative_proof(_load("bert-ort-attention.onnx"), {})
    result = prune_model(model, 0.5)
    report = build_report(result, "m", None, 0)
    assert report["max_error_relative"] is True
    assert "pruned == masked original: max error" in format_table(report)
    assert "relative to each output's largest magnitude" in format_table(report)


def _edit_attention(model, edit):
    node = _fused_nodes(model)[0]
    edit(model, node)
    return model


def _drop_num_heads(model, node):
    keep = [a for a in node.attribute if a.name != "num_heads"]
    del node.attribute[:]
    node.attribute.extend(keep)


def _cut_weight(model, node):
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:, :90], init.name))


@pytest.mark.parametrize("edit", [_drop_num_heads, _cut_weight])
def test_malformed_attention_is_rejected_cleanly(edit):
    model = _edit_attention(_load("bert-ort-attention.onnx"), edit)
    with pytest.raises(OnnxPruneError) as info:
        prune_model(model, 0.5)
    assert "\n" not in str(info.value)


def test_a_quantized_model_in_operator_form_is_refused_before_any_work():
    """QLinearMatMul (quantize_static, QOperator): no head can be followed through fused integer ops; say
    so at once, plainly, with the way out. (MatMulNBits is pruned: tests/test_quantized.py.)"""
    from onnx import TensorProto
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             numpy_helper.from_array(np.zeros((32, 16), np.uint8), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearMatMul", ["xq", "s", "z", "w", "s", "z", "s", "z"], ["yq"], name="qkv_q8"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxPruneError) as info:
        prune_model(model, 0.5)
    message = str(info.value)
    assert "operator form" in message and "qkv_q8" in message and "prune the float model, then quantize" in message
    assert "\n" not in message


def test_a_cache_read_outside_the_attention_is_an_explained_miss():
    """ORT's Whisper exporter counts the past length from the values of layer 0's cached keys (head 0 of
    batch 0). Pruning would change which head that reads, so that block is left whole, with the reason."""
    from onnxprune.api import inspect_model
    result = inspect_model(_load("whisper-ort-decoder.onnx"))
    assert len(result.blocks) == 3
    (miss,) = result.misses
    assert "past_key_self_0" in miss.reason and "Gather" in miss.reason
    pruned = prune_model(_load("whisper-ort-decoder.onnx"), 0.5)
    cache = {i.name: i.type.tensor_type.shape.dim[1].dim_value for i in pruned.model.graph.input}
    assert cache["past_key_self_0"] == 4 and cache["past_key_self_1"] == 2 and cache["past_key_cross_0"] == 2
    assert pruned.max_error <= 1e-4
