import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def models_dir():
    return MODELS


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The command line as a user runs it: a fresh interpreter, its output captured."""
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def matched(name: str):
    """(the pipeline state of ``models/NAME`` matched, every head kept; its options): what the tests of cuts
    inside the heads give their own plans to."""
    from onnxprune import pipeline
    from onnxprune.options import PruneOptions
    options = PruneOptions(ratio=0)
    return pipeline.match(pipeline.start(onnx.load(str(MODELS / name)), options), options), options


def random_dims(block, circuit: str, rank: int, rng):
    """A random ``cut.HeadDims`` of ``circuit`` for ``block``: [D, rank] per KV head (A), then per head (B)."""
    from onnxprune.cut import HeadDims
    d = block.head_dim
    a = {g: rng.standard_normal((d, rank)).astype(np.float32) for g in range(block.num_kv_heads)}
    b = {h: rng.standard_normal((d, rank)).astype(np.float32) for h in range(block.num_heads)}
    return HeadDims(circuit, a, b)


GATES = [[0.9, 0.0, 1.3, 0.4], [0.2, 1.1, 0.0, 0.7]]


def gated(model, before_softmax=False):
    """bert-ts with a [1, H, 1, 1] gate per block: on the attention probabilities (as a head mask or an L0
    gate sits), or on the scores before the Softmax (not foldable)."""
    from onnx import helper
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, s in enumerate([n for n in out.graph.node if n.op_type == "Softmax"]):
        g = f"gate{k}"
        out.graph.initializer.append(numpy_helper.from_array(np.array(GATES[k], np.float32).reshape(1, 4, 1, 1), g))
        at = list(out.graph.node).index(s)
        if before_softmax:
            src = s.input[0]
            s.input[0] = f"{src}_gated"
            out.graph.node.insert(at, helper.make_node("Mul", [src, g], [f"{src}_gated"], name=f"/gate{k}/Mul"))
        else:
            y = s.output[0]
            s.output[0] = f"{y}_ungated"
            out.graph.node.insert(at + 1, helper.make_node("Mul", [f"{y}_ungated", g], [y], name=f"/gate{k}/Mul"))
    onnx.checker.check_model(out)
    return out


def plant_in_rewrite(monkeypatch, fault):
    """A rewrite bug, planted: ``fault(array) -> array`` spoils the first MatMul weight of every pruned model
    the rewriter exports, so that a check which should catch a wrong rewrite can be seen to."""
    import onnxprune.rewrite as rewrite
    real = rewrite.check_model

    def planted(model, original):
        out = real(model, original)
        w = next(i for i in out.graph.initializer if i.name in {n.input[1] for n in out.graph.node
                                                                 if n.op_type == "MatMul"})
        w.CopyFrom(numpy_helper.from_array(fault(numpy_helper.to_array(w).copy()), w.name))
        return out

    monkeypatch.setattr(rewrite, "check_model", planted)


def genai_generate(folder, prompt=(1, 5, 7, 9, 11), steps: int = 12) -> list[int]:
    """Greedy tokens that onnxruntime-genai generates from a model folder (the caller skips without it)."""
    import onnxruntime_genai as og
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([list(prompt)])
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]
