"""A Llama-3-8B-shaped export bigger than the machine, and what pruning it costs (issue 26).

``build`` writes the shape of Llama 3 8B (32 layers, hidden 4096, 32 query heads on 8 KV heads of 128, SwiGLU FFN
14336, vocabulary 128256, an untied output head; 8.03B parameters: 16.1 GB in fp16, 32.1 GB in fp32) with random
weights and external data, one tensor at a time (``onnx.helper``; numpy and onnx only), never holding the model:
per layer an RMS norm written out (Pow, ReduceMean, Add, Sqrt, Div, Mul), Q/K/V projections without biases, the
heads split by a Reshape, K and V repeated to the query heads as torch exports ``repeat_kv`` (Unsqueeze, Expand,
Reshape), scaled scores, Softmax, the context, the output projection, and the SwiGLU MLP. No rotary embedding and
no causal mask: neither changes the weights' bytes, and both are tested on real exports in ``models/``.

``--alias`` writes layer 0's weights once and points every later layer's tensors at the same bytes of the data
file: each tensor is still read as its own (onnxprune, ONNX Runtime and ``onnx.load`` see a model of the full
size), but the disk holds one layer, so that the 32 GB fp32 model and its pruned copy fit this machine's disk.

``bench`` measures, each in a fresh process in one run, wall time and peak RSS (of the child: VmHWM) of
``onnx.load`` + ``onnx.save`` (skipped with ``--no-baseline``: a model bigger than the memory cannot be loaded),
``onnxprune MODEL --ratio 0.5 --gqa group -o OUT/`` (verified; the report's proof), ``onnxprune inspect``, and with
``--calib`` the same prune calibrated (``--synthetic-calib --compensate``), and prints the ratios to the baseline and
to the model's size.

    python tools/llama8b.py build --dtype fp16 --out ~/.cache/onnxprune/llama8b-fp16
    python tools/llama8b.py build --dtype fp32 --alias --out ~/.cache/onnxprune/llama8b-fp32
    python tools/llama8b.py bench ~/.cache/onnxprune/llama8b-fp16/model.onnx [--calib]
    python tools/llama8b.py bench ~/.cache/onnxprune/llama8b-fp32/model.onnx --no-baseline
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import external_tensor, save_decoder  # noqa: E402  (a sibling tool: numpy and onnx only)

SHAPE = dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256)


def build(folder: Path, dtype: str = "fp16", alias: bool = False, layers: int = 32, hidden: int = 4096,
          heads: int = 32, kv_heads: int = 8, ffn: int = 14336, vocab: int = 128256, seed: int = 0) -> Path:
    """Write folder/model.onnx and folder/model.onnx.data, one tensor at a time; returns the model's path."""
    np_type, elem = {"fp16": (np.float16, TensorProto.FLOAT16), "fp32": (np.float32, TensorProto.FLOAT)}[dtype]
    folder.mkdir(parents=True, exist_ok=True)
    d, group = hidden // heads, heads // kv_heads
    rng = np.random.default_rng(seed)
    data_path = folder / "model.onnx.data"
    inits, nodes = [], []
    written: dict[str, tuple[int, int]] = {}       # layer 0's weight -> (offset, length), for --alias

    def external(name, shape, offset, length):
        inits.append(external_tensor(name, elem, shape, data_path.name, offset, length))
        return name

    with open(data_path, "wb") as f:
        def weight(name, shape, role=None, scale=0.02):
            if alias and role in written:
                return external(name, shape, *written[role])
            offset = f.tell()
            for rows in np.array_split(np.arange(shape[0]), max(1, shape[0] * shape[1] // (1 << 26))):
                chunk = rng.standard_normal((len(rows), shape[1]), dtype=np.float32) * scale
                f.write(chunk.astype(np_type).tobytes())
            if role is not None:
                written[role] = (offset, f.tell() - offset)
            return external(name, shape, offset, f.tell() - offset)

        def const(name, arr):
            arr = np.asarray(arr)
            inits.append(onnx.numpy_helper.from_array(arr.astype(np_type) if arr.dtype.kind == "f" else arr, name))
            return name

        shapes = {
            "q": const("q_heads", np.array([0, 0, heads, d], np.int64)),
            "kv": const("kv_heads", np.array([0, 0, kv_heads, d], np.int64)),
            "repeat": const("repeat", np.array([1, 1, group, 1, 1], np.int64)),
            "merge_kv": const("merge_kv", np.array([0, heads, -1, d], np.int64)),
            "merge": const("merge", np.array([0, 0, hidden], np.int64)),
            "axis2": const("axis2", np.array([2], np.int64)),
        }
        two, eps, scale = const("two", np.array(2.0, np.float32)), const("eps", np.array(1e-5, np.float32)), \
            const("scale", np.array(1 / np.sqrt(d), np.float32))
        x = "hidden0"
        nodes.append(helper.make_node("Gather", [weight("embed", (vocab, hidden)), "input_ids"], [x], name="embed"))

        def rms(n, p, x, name):
            mean = n("ReduceMean", [n("Pow", [x, two], f"{name}_sq")], f"{name}_mean", axes=[-1], keepdims=1)
            root = n("Sqrt", [n("Add", [mean, eps], f"{name}_eps")], f"{name}_root")
            gain = const(p + f"{name}.weight", np.ones(hidden, np.float32))
            return n("Mul", [n("Div", [x, root], f"{name}_div"), gain], f"{name}_out")

        for i in range(layers):
            p = f"layers.{i}."

            def n(op, ins, out, **attrs):
                nodes.append(helper.make_node(op, ins, [p + out], name=p + out, **attrs))
                return p + out

            h = rms(n, p, x, "input_norm")
            q = n("Transpose", [n("Reshape", [n("MatMul", [h, weight(p + "q_proj.weight", (hidden, hidden), "q")], "q"),
                                             shapes["q"]], "q_split")], "q_t", perm=[0, 2, 1, 3])
            kv = {}
            for r in "kv":
                t = n("Transpose", [n("Reshape", [n("MatMul", [h, weight(p + f"{r}_proj.weight",
                                                                          (hidden, kv_heads * d), r)], r),
                                                  shapes["kv"]], f"{r}_split")], f"{r}_t", perm=[0, 2, 1, 3])
                t = n("Expand", [n("Unsqueeze", [t, shapes["axis2"]], f"{r}_unsq"), shapes["repeat"]], f"{r}_expand")
                kv[r] = n("Reshape", [t, shapes["merge_kv"]], f"{r}_repeat")
            s = n("Mul", [n("MatMul", [q, n("Transpose", [kv["k"]], "k_tt", perm=[0, 1, 3, 2])], "scores"), scale],
                  "scaled")
            ctx = n("MatMul", [n("Softmax", [s], "probs", axis=-1), kv["v"]], "ctx")
            ctx = n("Reshape", [n("Transpose", [ctx], "ctx_t", perm=[0, 2, 1, 3]), shapes["merge"]], "ctx_merge")
            x = n("Add", [x, n("MatMul", [ctx, weight(p + "o_proj.weight", (hidden, hidden), "o")], "o")], "res1")
            h = rms(n, p, x, "post_norm")
            gate = n("MatMul", [h, weight(p + "gate_proj.weight", (hidden, ffn), "gate")], "gate")
            act = n("Mul", [gate, n("Sigmoid", [gate], "gate_sig")], "silu")
            up = n("MatMul", [h, weight(p + "up_proj.weight", (hidden, ffn), "up")], "up")
            down = n("MatMul", [n("Mul", [act, up], "swiglu"), weight(p + "down_proj.weight", (ffn, hidden), "down")],
                     "down")
            x = n("Add", [x, down], "res2")

        def n(op, ins, out, **attrs):
            nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
            return out
        logits = n("MatMul", [rms(n, "", x, "norm"), weight("lm_head.weight", (hidden, vocab))], "logits")
    return save_decoder(folder, "llama", nodes, inits, logits, elem, vocab)


def measure(argv: list[str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in GiB, output tail) of ``python argv...`` in a fresh process, the peak
    read from the child's own VmHWM (``ru_maxrss`` of children would include this process's memory)."""
    probe = ("import runpy, sys, atexit\n"
             "def peak():\n"
             "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
             "    sys.stderr.write('\\nVMHWM ' + line.split()[1] + '\\n')\n"
             "atexit.register(peak)\n"
             "mode, what = sys.argv[1:3]\n"
             "sys.argv = [what] + sys.argv[3:]\n"
             "exec(what) if mode == '-c' else runpy.run_module(what, run_name='__main__')\n")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
    dt = time.perf_counter() - t
    hwm = [line for line in r.stderr.splitlines() if line.startswith("VMHWM ")]
    gib = int(hwm[-1].split()[1]) / 2**20 if hwm else float("nan")
    return r.returncode, dt, gib, (r.stdout + r.stderr)[-3000:]


def bench(model: Path, work: Path, baseline: bool, calib: bool, keep: bool) -> int:
    size = sum(p.stat().st_size for p in model.parent.iterdir() if p.name.startswith("model.onnx"))
    full = _declared_bytes(model)
    print(f"{model}: {full / 1e9:.2f} GB of weights declared ({size / 1e9:.2f} GB on disk)")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if baseline:
        out = work / "saved"
        out.mkdir(exist_ok=True)
        code = (f"import onnx; m = onnx.load({str(model)!r}); onnx.save(m, {str(out / 'model.onnx')!r}, "
                "save_as_external_data=True, location='model.onnx.data')")
        rows.append(("onnx.load + onnx.save", *measure(["-c", code])))
        shutil.rmtree(out, ignore_errors=True)
    runs = [("inspect", ["inspect", str(model)], None),
            ("--ratio 0.5 --gqa group (verified)", [str(model), "--ratio", "0.5", "--gqa", "group"], "pruned")]
    if calib:
        runs.append(("the same, --synthetic-calib --compensate",
                     [str(model), "--ratio", "0.5", "--gqa", "group", "--synthetic-calib", "--compensate"], "calib"))
    for name, args, out in runs:
        if out:
            shutil.rmtree(work / out, ignore_errors=True)
            args = args + ["-o", str(work / out) + "/", "--report", str(work / f"{out}.json")]
        rc, dt, gib, tail = measure(["-m", "onnxprune.cli", *args])
        rows.append((name, rc, dt, gib, tail))
        if rc:
            print(f"{name}: exit {rc}\n{tail}")
        elif out:
            report = json.loads((work / f"{out}.json").read_text())
            print(f"{name}: proof {report.get('proof')}, max error {report.get('max_error')}")
            if not keep:
                shutil.rmtree(work / out, ignore_errors=True)
    base = rows[0] if baseline else None
    print(f"\n{'':44}{'exit':>5}{'time s':>9}{'peak GiB':>10}{'x size':>8}" + (f"{'time x':>8}{'memory x':>10}"
                                                                             if base else ""))
    for name, rc, dt, gib, _ in rows:
        line = f"{name:44}{rc:5}{dt:9.1f}{gib:10.2f}{gib * 2**30 / full:8.2f}"
        if base:
            line += f"{dt / base[2]:8.2f}{gib / base[3]:10.2f}"
        print(line)
    return max(r[1] for r in rows)


def _declared_bytes(path: Path) -> int:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    m = onnx.load(str(path), load_external_data=False)
    return sum(int(ExternalDataInfo(t).length) if uses_external_data(t) else len(t.raw_data)
               for t in m.graph.initializer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the model")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    b.add_argument("--alias", action="store_true", help="every layer's tensors point at layer 0's bytes")
    b.add_argument("--layers", type=int, default=SHAPE["layers"])
    m = sub.add_parser("bench", help="time and peak memory of load + save, onnxprune and inspect")
    m.add_argument("model", type=Path)
    m.add_argument("--work", type=Path, help="where the outputs go (default: beside the model)")
    m.add_argument("--no-baseline", action="store_true", help="skip onnx.load + onnx.save")
    m.add_argument("--calib", action="store_true", help="also the calibrated, compensated prune")
    m.add_argument("--keep", action="store_true", help="keep the pruned models")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        t = time.perf_counter()
        path = build(args.out, args.dtype, args.alias, layers=args.layers)
        print(f"wrote {path} ({_declared_bytes(path) / 1e9:.2f} GB of weights, "
              f"{(path.parent / 'model.onnx.data').stat().st_size / 1e9:.2f} GB on disk) "
              f"in {time.perf_counter() - t:.0f} s")
        return 0
    return bench(args.model, args.work or args.model.parent / "bench", not args.no_baseline, args.calib, args.keep)


if __name__ == "__main__":
    sys.exit(main())
