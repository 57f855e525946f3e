"""Make the ONNX Runtime-fused test models in ``models/`` from the plain exports already there.

Deployment teams often receive the graph that ONNX Runtime's transformer optimizer wrote, with the
attention fused into one ``com.microsoft`` node. This script runs that optimizer (it ships with the
``onnxruntime`` package; no torch needed) on committed exports:

    python tools/fuse_models.py            # all of them
    python tools/fuse_models.py --list

Each output is checked to give what its source export gives on ONNX Runtime, and recorded in
``models/MANIFEST.json`` with the command that made it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from manifest import record  # noqa: E402  (tools/ is on the path when a tool runs)

MODELS = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Fused:
    name: str            # output file stem
    source: str          # export in models/ it is made from
    family: str          # README family
    model_type: str      # optimize_model model_type
    num_heads: int
    hidden_size: int
    op: str              # the fused op the file must contain
    mha: bool = False    # FusionOptions.use_multi_head_attention
    fp16: bool = False   # convert_float_to_float16(keep_io_types=True) afterwards


FUSED = [
    Fused("bert-ort-attention", "bert-ts", "BERT", "bert", 4, 32, "Attention"),
    Fused("bert-ort-attention-fp16", "bert-ts", "BERT", "bert", 4, 32, "Attention", fp16=True),
    Fused("clip-vision-ort-attention", "clip-vision-ts", "CLIP vision", "clip", 4, 32, "Attention"),
    Fused("bert-ort-mha", "bert-ts", "BERT", "bert", 4, 32, "MultiHeadAttention", mha=True),
]


def fuse(spec: Fused, out_dir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(spec.model_type)
    options.use_multi_head_attention = spec.mha
    opt = optimize_model(str(MODELS / f"{spec.source}.onnx"), model_type=spec.model_type,
                         num_heads=spec.num_heads, hidden_size=spec.hidden_size, opt_level=0,
                         optimization_options=options)
    if spec.fp16:
        opt.convert_float_to_float16(keep_io_types=True)
    model = opt.model
    found = sum(1 for n in model.graph.node if n.op_type == spec.op and n.domain == "com.microsoft")
    if not found:
        raise RuntimeError(f"{spec.name}: the optimizer wrote no com.microsoft.{spec.op}")
    path = out_dir / f"{spec.name}.onnx"
    opt.save_model_to_file(str(path))     # also declares the com.microsoft opset
    _check_against_source(path, MODELS / f"{spec.source}.onnx", atol=2e-2 if spec.fp16 else 1e-4)
    return path


def _check_against_source(path: Path, source: Path, atol: float):
    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(MODELS.parent))
    from onnxprune.inputs import synth_inputs

    feeds = synth_inputs(onnx.load(str(source)))
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds) for p in (source, path)]
    err = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()) for a, b in zip(*runs))
    if err > atol:
        raise RuntimeError(f"{path.name} differs from {source.name} by {err:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="names containing this (repeatable)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    specs = [s for s in FUSED if not args.only or any(o in s.name for o in args.only)]
    if args.list:
        for s in specs:
            print(f"{s.name:28} {s.op:20} from {s.source}")
        return 0
    import onnxruntime
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    entries = {}
    for spec in specs:
        path = fuse(spec, MODELS)
        entries[path.name] = {
            "family": spec.family, "exporter": "ort-optimizer", "attention": spec.op,
            "opset": 17, "source": f"{spec.source}.onnx",
            "command": f"python tools/fuse_models.py --only {spec.name}",
            "onnxruntime": onnxruntime.__version__, "fp16": spec.fp16,
        }
        print(f"ok   {path.name:32} {path.stat().st_size / 1024:7.1f} KiB")
    record(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
