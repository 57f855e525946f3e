"""Make the quantized models in ``models/`` with onnxruntime's own quantizers (no torch at this step; the
fp32 bases are exported once by ``export_models.py`` into a cache).

For a BERT (4 heads of 64) and a Llama-style decoder (8 heads of 32 on 4 KV heads), each quantized in the
forms that users get from onnxruntime:

* ``dyn``        ``quantize_dynamic``, int8 weights (DynamicQuantizeLinear + MatMulInteger);
* ``qdq``        ``quantize_static`` QDQ, per-tensor int8 weights and activations;
* ``qdq-pc``     the same with per-channel weights;
* ``qop``        ``quantize_static`` QOperator (QLinearMatMul): refused, with the reason;
* ``nbits32``    ``MatMulNBitsQuantizer`` int4, blocks of 32 rows;
* ``nbits128``   the same with blocks of 128 rows;
* ``int4qdq32``, ``int4qdq128`` (the Llama only): ``MatMulNBitsQuantizer`` in QDQ form, blockwise int4
  ``DequantizeLinear`` (opset 21; the base is converted to it first).

    python tools/quantize_models.py [--only llama]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manifest import MODELS, record  # noqa: E402

CACHE = Path.home() / ".cache" / "onnxprune" / "qbase"
FORMS = ("dyn", "qdq", "qdq-pc", "qop", "nbits32", "nbits128", "int4qdq32", "int4qdq128")
ONLY = {"int4qdq32": "llama", "int4qdq128": "llama"}
REFUSED = {"qop": "operator form"}


def base(name: str) -> Path:
    path = CACHE / f"{name}-qbase-ts.onnx"
    if not path.exists():
        from export_models import export, quant_base_specs
        CACHE.mkdir(parents=True, exist_ok=True)
        export(next(s for s in quant_base_specs() if s.name == f"{name}-qbase-ts"), CACHE)
    return path


class _Reader:
    """Calibration batches for the static quantizer: random token ids, one padded row."""

    def __init__(self, inputs: list[str], batches: int = 8):
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(batches):
            ids = rng.integers(1, 64, (2, 7)).astype(np.int64)
            mask = np.ones_like(ids)
            mask[1, -2:] = 0
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            self.items.append({k: v for k, v in feeds.items() if k in inputs})
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)


def quantize(src: Path, form: str, out: Path, reader=None):
    """``src`` quantized in ``form`` into ``out``; ``reader``: the static quantizer's calibration batches
    (default: random token ids)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    inputs = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    if form == "dyn":
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    elif form.startswith("qdq") or form == "qop":
        fmt = QuantFormat.QOperator if form == "qop" else QuantFormat.QDQ
        quantize_static(str(src), str(out), reader or _Reader(inputs), quant_format=fmt,
                        per_channel=form == "qdq-pc")
    elif form.startswith("nbits"):
        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=int(form[5:]), is_symmetric=False)
        q.process()
        q.model.save_model_to_file(str(out))
    elif form.startswith("int4qdq"):
        from onnx import version_converter
        q = MatMulNBitsQuantizer(version_converter.convert_version(onnx.load(str(src)), 21),
                                 block_size=int(form[7:]), is_symmetric=False, quant_format=QuantFormat.QDQ)
        q.process()
        q.model.save_model_to_file(str(out))
    else:
        raise ValueError(form)


def main(argv=None) -> int:
    import logging
    logging.disable(logging.INFO)          # the n-bit quantizer logs a line per node it skips
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--out", type=Path, default=MODELS)
    args = ap.parse_args(argv)
    import onnx
    import onnxruntime
    entries = {}
    for name in ("bert", "llama"):
        if args.only and not any(o in name for o in args.only):
            continue
        src = base(name)
        for form in FORMS:
            if ONLY.get(form, name) != name:
                continue
            out = args.out / f"{name}-{form}.onnx"
            quantize(src, form, out)
            onnx.checker.check_model(onnx.load(str(out)), full_check=True)
            entries[out.name] = {"family": f"{'BERT' if name == 'bert' else 'Llama'}, quantized",
                                 "quantized": form, "command": f"python tools/quantize_models.py --only {name}",
                                 "onnxruntime": onnxruntime.__version__}
            if form in REFUSED:
                entries[out.name]["refused"] = REFUSED[form]
            print(f"ok   {out.name:24} {out.stat().st_size / 1024:7.1f} KiB")
    record(entries, folder=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
