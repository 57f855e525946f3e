"""Pruned models keep ONNX Runtime's fast paths: its transformer optimizer still fuses their attention.

A pruned model can hold a different head count in every block, so no single ``num_heads`` fits it: the
optimizer has to detect the counts itself (``num_heads=0``). onnxprune writes each block's head count as
an explicit constant in the Q/K/V reshapes, where the export had ``-1``, so that detection works.
"""

import logging
from pathlib import Path

import onnx
import pytest

from onnxprune import prune_model
from onnxprune.probe import synth_inputs
from onnxprune.verify import max_abs_diff, run

optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")

MODELS = Path(__file__).resolve().parent.parent / "models"
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


@pytest.mark.parametrize("name", ["gpt2-ts.onnx", "gpt2-d18.onnx"])
def test_pruned_gpt2_fuses_as_much_as_the_original(name):
    # ONNX Runtime 1.32 fuses no attention in transformers-5 GPT-2 exports, even unpruned with explicit
    # counts; this pins that pruning does not make it worse.
    model = onnx.load(str(MODELS / name))
    _, before = _fuse(model, "gpt2", num_heads=4, hidden_size=32)
    _, after = _fuse(prune_model(model, 0.5).model, "gpt2")
    assert after >= before
