"""Pruning a model above 2 GB: time and peak memory against a plain ``onnx.load`` + ``onnx.save``.

Builds a synthetic decoder with external data in seconds (onnx.helper, weights written straight to the
data file): per layer a LayerNorm, Q/K/V projections with biases, Reshape to [B, S, H, D] through one
shape constant that every layer shares, Transpose, scaled scores, Softmax, the context product, the
merge-back Reshape, the output projection, and a ReLU MLP. Then, each in a fresh process, measured in the
same run:

* baseline: ``onnx.load`` (with the external data) + ``onnx.save`` to a new external-data file;
* onnxprune: ``onnxprune MODEL --ratio 0.5 -o OUT/`` (verification included, and without it).

It prints wall time and peak RSS of each, and the ratios to the baseline. Goal: at most 1.5 times the
time and 1.2 times the peak memory.

    python tools/bench_scale.py                  # about 2.5 GB, in a temporary folder
    python tools/bench_scale.py --gb 3.5 --keep /tmp/scale
    python tools/bench_scale.py --gb 2 --fp16    # every weight and activation fp16 (issue 26)

``inspect`` is measured too (the probe alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def external_tensor(name: str, elem: int, shape, location: str, offset: int, length: int) -> TensorProto:
    """An initializer whose data lies in ``location`` at ``offset`` (``length`` bytes), its bytes never in memory."""
    t = TensorProto(name=name, data_type=elem, dims=list(shape))
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL
    return t


def save_decoder(folder: Path, name: str, nodes: list, inits: list, output: str, elem: int, width: int) -> Path:
    """folder/model.onnx: ``nodes`` and ``inits`` as a model of ``input_ids`` [batch, sequence] to ``output``
    [batch, sequence, width] of type ``elem``, opset 17; returns its path."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info(output, elem, ["batch", "sequence", width])], inits)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def build(folder: Path, gb: float, hidden: int = 2048, heads: int = 32, ffn: int = 5632, vocab: int = 32000,
          layers: int | None = None, fp16: bool = False) -> Path:
    """Write folder/model.onnx + model.onnx.data; returns the model path."""
    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn
    layers = layers or max(1, round((gb * 2**30 / np.dtype(dtype).itemsize - vocab * hidden) / per_layer))
    d = hidden // heads
    rng = np.random.default_rng(0)
    data_path = folder / "model.onnx.data"
    inits, nodes = [], []
    with open(data_path, "wb") as f:
        def weight(name, shape, scale=0.02):
            arr = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)
            offset = f.tell()
            f.write(arr.tobytes())
            inits.append(external_tensor(name, elem, shape, data_path.name, offset, arr.nbytes))
            return name

        def const(name, arr):
            arr = np.asarray(arr)
            inits.append(onnx.numpy_helper.from_array(arr.astype(dtype) if arr.dtype == np.float32 else arr, name))
            return name

        split = const("split_heads", np.array([0, 0, heads, d], np.int64))   # shared by every layer
        merge = const("merge_heads", np.array([0, 0, hidden], np.int64))
        scale = const("scale", np.array(1 / np.sqrt(d), np.float32))
        x = "hidden0"
        nodes.append(helper.make_node("Gather", [weight("embed", (vocab, hidden)), "input_ids"], [x]))
        for i in range(layers):
            p = f"l{i}."

            def n(op, ins, out, **attrs):
                nodes.append(helper.make_node(op, ins, [p + out], name=p + out, **attrs))
                return p + out

            ln = n("LayerNormalization", [x, const(p + "ln1.g", np.ones(hidden, np.float32)),
                                          const(p + "ln1.b", np.zeros(hidden, np.float32))], "ln1", axis=-1)
            qkv = {}
            for r in "qkv":
                proj = n("MatMul", [ln, weight(p + f"{r}.weight", (hidden, hidden))], f"{r}_mm")
                proj = n("Add", [proj, const(p + f"{r}.bias", np.zeros(hidden, np.float32))], f"{r}_add")
                heads4 = n("Reshape", [proj, split], f"{r}_split")
                qkv[r] = n("Transpose", [heads4], f"{r}_t", perm=[0, 2, 3, 1] if r == "k" else [0, 2, 1, 3])
            s = n("Mul", [n("MatMul", [qkv["q"], qkv["k"]], "scores"), scale], "scaled")
            probs = n("Softmax", [s], "probs", axis=-1)
            ctx = n("Transpose", [n("MatMul", [probs, qkv["v"]], "ctx")], "ctx_t", perm=[0, 2, 1, 3])
            ctx = n("Reshape", [ctx, merge], "ctx_merge")
            o = n("Add", [n("MatMul", [ctx, weight(p + "o.weight", (hidden, hidden))], "o_mm"),
                          const(p + "o.bias", np.zeros(hidden, np.float32))], "o_add")
            x = n("Add", [x, o], "res1")
            ln2 = n("LayerNormalization", [x, const(p + "ln2.g", np.ones(hidden, np.float32)),
                                           const(p + "ln2.b", np.zeros(hidden, np.float32))], "ln2", axis=-1)
            up = n("Relu", [n("MatMul", [ln2, weight(p + "up.weight", (hidden, ffn))], "up")], "act")
            x = n("Add", [x, n("MatMul", [up, weight(p + "down.weight", (ffn, hidden))], "down")], "res2")
    return save_decoder(folder, "scale", nodes, inits, x, elem, hidden)


def measure(code: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of ``python -c code`` in a fresh process."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "r = subprocess.run([sys.executable, '-c', sys.argv[1]]); "
               "dt = time.perf_counter() - t; "
               "print(json.dumps([r.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    out = subprocess.run([sys.executable, "-c", wrapper, code], capture_output=True, text=True)
    rc, seconds, kib = json.loads(out.stdout.strip().splitlines()[-1])
    if rc:
        raise RuntimeError(f"failed: {code}\n{out.stderr[-2000:]}")
    return seconds, kib / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.5, help="model size in GB (default 2.5)")
    ap.add_argument("--keep", type=Path, help="build and keep the model in this folder")
    ap.add_argument("--fp16", action="store_true", help="fp16 weights and activations")
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnxprune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        src = work / "src"
        src.mkdir(exist_ok=True)
        model = build(src, args.gb, fp16=args.fp16)
        size = sum(p.stat().st_size for p in src.iterdir()) / 2**30
        print(f"built {model} ({size:.2f} GB) in {time.perf_counter() - t:.1f} s")
        base_out, pruned, noverify, segmented = work / "base", work / "pruned", work / "noverify", work / "segmented"
        for d in (base_out, pruned, noverify, segmented):
            d.mkdir(exist_ok=True)
        rows = [
            ("onnx.load + onnx.save", f"import onnx; m = onnx.load({str(model)!r}); onnx.save(m, "
             f"{str(base_out / 'model.onnx')!r}, save_as_external_data=True, location='model.onnx.data')"),
            ("onnxprune --ratio 0.5", f"import sys; from onnxprune.cli import main; "
             f"sys.exit(main([{str(model)!r}, '--ratio', '0.5', '-o', {str(pruned) + '/'!r}]))"),
            ("onnxprune --ratio 0.5 --no-verify", f"import sys; from onnxprune.cli import main; "
             f"sys.exit(main([{str(model)!r}, '--ratio', '0.5', '-o', {str(noverify) + '/'!r}, '--no-verify']))"),
            ("onnxprune --ratio 0.5 --proof segments", f"import sys; from onnxprune.cli import main; "
             f"sys.exit(main([{str(model)!r}, '--ratio', '0.5', '-o', {str(segmented) + '/'!r}, '--proof', "
             "'segments']))"),
            ("onnxprune inspect", f"import sys; from onnxprune.cli import main; "
             f"sys.exit(main(['inspect', {str(model)!r}]))"),
        ]
        results = [(name, *measure(code)) for name, code in rows]
        base_t, base_m = results[0][1], results[0][2]
        print(f"\n{'':40}{'time s':>9}{'peak GiB':>10}{'time x':>8}{'memory x':>10}")
        for name, seconds, gib in results:
            print(f"{name:40}{seconds:9.1f}{gib:10.2f}{seconds / base_t:8.2f}{gib / base_m:10.2f}")
        out_size = sum(p.stat().st_size for p in pruned.iterdir()) / 2**30
        print(f"\nmodel {size:.2f} GB -> pruned {out_size:.2f} GB; goal: time x <= 1.5, memory x <= 1.2")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
