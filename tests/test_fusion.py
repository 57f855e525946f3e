"""Pruned models keep ONNX Runtime's fast paths: its transformer optimizer still fuses their attention.

A pruned model can hold a different head count in every block, so no single ``num_heads`` fits it: the
optimizer has to detect the counts itself (``num_heads=0``). onnxprune writes each block's head count as
an explicit constant in the Q/K/V reshapes, where the export had ``-1``, so that detection works.
"""

import logging

import onnx
import pytest

from onnxprune import prune_model
from onnxprune.inputs import synth_inputs
from onnxprune.verify import kept_heads_only, max_abs_diff, run

optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")

from conftest import MODELS  # noqa: E402
logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)


def _fuse(model, model_type, num_heads=0, hidden_size=0):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)             # the optimizer edits the model it is given
    fused = optimizer.optimize_model(copy, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                     opt_level=0)
    return fused.model, fused.get_fused_operator_statistics().get("Attention", 0)


def _attention_heads(model):
    return [next(a.i for a in n.attribute if a.name == "num_heads") for n in model.graph.node
            if n.op_type == "Attention"]


@pytest.mark.parametrize("name", ["bert-ts.onnx", "distilbert-ts.onnx", "roberta-ts.onnx"])
def test_pruned_bert_fuses_every_attention(name):
    model = onnx.load(str(MODELS / name))
    _, before = _fuse(model, "bert", num_heads=4, hidden_size=32)     # the most the optimizer fuses here
    assert before == 2
    # different head counts per block: only detection from the graph can get them right
    result = prune_model(model, kept={0: (0, 2, 3), 1: (1,)})
    fused, after = _fuse(result.model, "bert")
    assert after == before
    assert _attention_heads(fused) == [3, 1]
    feeds = synth_inputs(model, batch=3, seq=6)
    assert max_abs_diff(run(result.model, feeds), run(fused, feeds)) <= 1e-4


def test_the_export_alone_needs_the_head_count():
    """Why the constant is written: the export's own -1 leaves the optimizer unable to fuse by itself."""
    _, fused = _fuse(onnx.load(str(MODELS / "bert-ts.onnx")), "bert")
    assert fused == 0


def test_pruned_gpt2_fuses_as_much_as_the_original():
    """ORT fuses GPT-2 only in the graph its own GPT-2 exporter writes (with a KV cache); transformers-5
    exports fuse no attention at all, pruned or not. Its GPT-2 fusion writes the ``num_heads`` it is given
    (0 when asked to detect), so a runnable fused model needs one count for all blocks: a uniform plan."""
    model = onnx.load(str(MODELS / "gpt2-ort-past.onnx"))
    _, before = _fuse(model, "gpt2")
    assert before == 2
    assert _fuse(prune_model(model, kept={0: (0, 2, 3), 1: (1,)}).model, "gpt2")[1] == before
    result = prune_model(model, kept={0: (1, 3), 1: (0, 2)})
    fused, after = _fuse(result.model, "gpt2", num_heads=2, hidden_size=32)
    assert after == before
    assert _attention_heads(fused) == [2, 2]
    for past in (0, 3):
        feeds = kept_heads_only(synth_inputs(model, batch=2, seq=4, past=past), result.io_keep)
        assert max_abs_diff(run(result.model, feeds), run(fused, feeds)) <= 1e-4


def test_shape_annotations_are_recomputed_not_dropped_or_stale():
    """ORT's float16 converter stores every intermediate shape (value_info), and ORT's CUDA fusions read
    them: without them the pruned fp16 MiniLM lost all 6 of its SkipLayerNormalization fusions on an H100
    (docs/gpu.md). The pruned model keeps an annotation for the tensors the original annotated, each
    agreeing with the shape that the tensor really has at run time."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(MODELS / "bert-ts.onnx")), keep_io_types=True)
    assert len(model.graph.value_info) > 50
    result = prune_model(model, 0.5)
    pruned = result.model
    annotated = {v.name: v for v in pruned.graph.value_info}
    assert len(annotated) > 0.8 * len(model.graph.value_info)
    probe = onnx.ModelProto()
    probe.CopyFrom(pruned)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in annotated)
    feeds = synth_inputs(model, batch=3, seq=7)
    values = run(probe, feeds)
    narrowed = 0
    for name, info in annotated.items():
        dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        real = values[name].shape
        assert len(dims) == len(real), name
        assert all(d is None or d == r for d, r in zip(dims, real)), (name, dims, real)
        narrowed += 2 in dims and 4 not in dims and "attention/self" in name
    assert narrowed > 0                          # the [.., 2 heads, ..] annotations were recomputed
