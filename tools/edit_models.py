"""Make the models in ``models/`` that reproduce what other projects' exports do and torch's exporter does not:
a few lines of onnx helper code over a model exported by ``export_models.py`` (or from nothing), so that each
class of export that broke onnxprune on a real model has a small copy in the suite (no torch at this step).

* ``bert-lang-table.onnx``: bert-ts with a third integer input, ``lang_ids``, that indexes a language table of 4
  rows added to the word embeddings (an OCR recogniser's and a TTS model's language / speaker ids): synthetic
  ids up to 15 overflowed it ("indices element out of data bounds").
* ``bert-int8-cast.onnx``, ``llama-int8-cast-rows.onnx``: bert-ts and llama-ts (8 heads on 2 KV heads) with
  every matrix weight as int8 data -> ``Cast`` -> ``Mul`` by a scale per column (``[1, N]``; per row, ``[K, 1]``,
  for the Llama): weight-only int8 written by hand, which no quantizer of onnxruntime writes.
* ``albert-dyn-shared.onnx``: albert-ts with its one layer's weights read directly by both blocks (no
  Identity), then ``quantize_dynamic``: each int8 weight is read by two ``MatMulInteger`` nodes, as in the
  quantized ALBERT-style models that broke the float view ("two nodes with same node name").
* ``bert-ort-extended.onnx``, ``llama-ort-extended.onnx``: bert-ts and llama-ts saved by ONNX Runtime after its
  CPU graph optimizations (``ORT_ENABLE_EXTENDED``, ``optimized_model_filepath``), as users save a model to load
  it faster: the scores become ``FusedMatMul`` (scale and transpose folded in) and the shape arithmetic a
  ``Split`` of the shape vector.
* ``bert-dyn-ort-extended.onnx``, ``albert-dyn-shared-ort-extended.onnx``: bert-dyn and albert-dyn-shared saved
  the same way: ``quantize_dynamic``'s int8 matmuls become ``DynamicQuantizeMatMul`` and ``MatMulIntegerToFloat``
  (the quantized ALBERT-style model of issue 25 had been through that optimizer).
* ``no-attention-mlp.onnx``: two dense layers and no attention, whose input is reshaped to 7 rows: it runs on a
  batch of 7 and on no synthetic batch; onnxprune must say "no attention" before it runs anything.

    python tools/edit_models.py [--only NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manifest import MODELS, record  # noqa: E402


def bert_lang_table() -> onnx.ModelProto:
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    g = model.graph
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    width = next(list(i.dims) for i in g.initializer if i.name == gather.input[0])[1]
    table = np.random.default_rng(0).standard_normal((4, width)).astype(np.float32) * 0.02
    g.initializer.append(numpy_helper.from_array(table, "lang_embeddings.weight"))
    g.input.append(helper.make_tensor_value_info("lang_ids", TensorProto.INT64, ["batch", "sequence"]))
    word = gather.output[0]
    summed = word + "_with_lang"
    for n in g.node:          # every reader of the word embeddings reads them with the language added
        for k, name in enumerate(n.input):
            if name == word:
                n.input[k] = summed
    at = list(g.node).index(gather) + 1
    g.node.insert(at, helper.make_node("Gather", ["lang_embeddings.weight", "lang_ids"], ["lang_vectors"],
                                       name="/model/embeddings/lang_embeddings/Gather"))
    g.node.insert(at + 1, helper.make_node("Add", [word, "lang_vectors"], [summed],
                                           name="/model/embeddings/lang_embeddings/Add"))
    return model


def int8_by_cast(source: str, per_row: bool) -> onnx.ModelProto:
    """Every 2-D float initializer that a MatMul reads as its weight, as int8 codes cast to float and scaled
    (symmetric, the scale per column or per row)."""
    model = onnx.load(str(MODELS / source))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    weights = {n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == TensorProto.FLOAT}
    for name in sorted(weights):
        w = numpy_helper.to_array(inits[name])
        scale = np.abs(w).max(axis=1 if per_row else 0, keepdims=True) / 127
        scale[scale == 0] = 1
        codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        inits[name].CopyFrom(numpy_helper.from_array(codes, f"{name}.int8"))
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale"))
        first = next(k for k, n in enumerate(g.node) if name in n.input)
        g.node.insert(first, helper.make_node("Mul", [f"{name}.float", f"{name}.scale"], [name], name=f"{name}.Mul"))
        g.node.insert(first, helper.make_node("Cast", [f"{name}.int8"], [f"{name}.float"], name=f"{name}.Cast",
                                              to=TensorProto.FLOAT))
    return model


def albert_dyn_shared() -> onnx.ModelProto:
    import tempfile
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model = onnx.load(str(MODELS / "albert-ts.onnx"))
    inits = {i.name for i in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    nodes = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in nodes:
        n.input[:] = [alias.get(i, i) for i in n.input]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/shared.onnx")
        quantize_dynamic(f"{tmp}/shared.onnx", f"{tmp}/dyn.onnx", weight_type=QuantType.QInt8)
        return onnx.load(f"{tmp}/dyn.onnx")


def ort_extended(source) -> onnx.ModelProto:
    """``source`` (a file in models/, or a maker of a model) as ONNX Runtime saves it after its CPU optimizations."""
    import tempfile
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        path = str(MODELS / source) if isinstance(source, str) else f"{tmp}/source.onnx"
        if not isinstance(source, str):
            onnx.save(source(), path)
        opts.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return onnx.load(f"{tmp}/opt.onnx")


def no_attention_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "fc1.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "fc2.weight")
    rows = numpy_helper.from_array(np.array([7, -1], dtype=np.int64), "rows")
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["x7"], name="rows7"),
             helper.make_node("MatMul", ["x7", "fc1.weight"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 3])], [w1, w2, rows])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx.helper")


MAKERS = {
    "bert-lang-table.onnx": (bert_lang_table, {"family": "BERT, a 4-row language table", "source": "bert-ts.onnx"}),
    "bert-int8-cast.onnx": (lambda: int8_by_cast("bert-ts.onnx", per_row=False),
                            {"family": "BERT, int8 by Cast and Mul", "source": "bert-ts.onnx", "quantized": "cast"}),
    "llama-int8-cast-rows.onnx": (lambda: int8_by_cast("llama-ts.onnx", per_row=True),
                                  {"family": "Llama, int8 by Cast and Mul", "source": "llama-ts.onnx",
                                   "quantized": "cast"}),
    "albert-dyn-shared.onnx": (albert_dyn_shared, {"family": "ALBERT, quantized", "source": "albert-ts.onnx",
                                                   "quantized": "dyn-shared"}),
    "bert-ort-extended.onnx": (lambda: ort_extended("bert-ts.onnx"),
                               {"family": "BERT, saved by ONNX Runtime's CPU optimizer", "source": "bert-ts.onnx",
                                "ort_optimized": "extended"}),
    "llama-ort-extended.onnx": (lambda: ort_extended("llama-ts.onnx"),
                                {"family": "Llama, saved by ONNX Runtime's CPU optimizer", "source": "llama-ts.onnx",
                                 "ort_optimized": "extended"}),
    "bert-dyn-ort-extended.onnx": (lambda: ort_extended("bert-dyn.onnx"),
                                   {"family": "BERT, quantized", "source": "bert-dyn.onnx", "quantized": "dyn-ort",
                                    "ort_optimized": "extended"}),
    "albert-dyn-shared-ort-extended.onnx": (lambda: ort_extended(albert_dyn_shared),
                                            {"family": "ALBERT, quantized", "source": "albert-dyn-shared.onnx",
                                             "quantized": "dyn-shared-ort", "ort_optimized": "extended"}),
    "no-attention-mlp.onnx": (no_attention_mlp, {"family": "no attention", "refused": "no attention"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="make only the model whose file name starts with this")
    args = ap.parse_args(argv)
    entries = {}
    for name, (make, about) in MAKERS.items():
        if args.only and not name.startswith(args.only):
            continue
        model = make()
        if not about.get("ort_optimized"):       # ORT writes its contrib ops into the default domain
            onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(MODELS / name))
        entries[name] = {**about, "exporter": "onnx-helper", "opset": model.opset_import[0].version,
                         "command": f"python tools/edit_models.py --only {name[:-5]}", "onnx": onnx.__version__}
        if about.get("quantized") or about.get("ort_optimized"):
            import onnxruntime
            entries[name]["onnxruntime"] = onnxruntime.__version__
        print(f"wrote models/{name}")
    record(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
