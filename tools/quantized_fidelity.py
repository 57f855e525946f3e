"""Prune then quantize, or quantize then prune? all-MiniLM-L6-v2 (real weights) in the forms that
onnxruntime's quantizers write, pruned at ratios 0.25 and 0.5 in both orders, against the fp32 model.

Calibration sentences (for the head scores and for the static quantizer) are prose of the Python docs;
the held-out sentences are Debian's licence texts (``texts.py``). Each model's sentence embeddings are
compared with the unpruned fp32 model's (mean cosine, top-1 neighbour agreement; see ``fidelity.py``).

* quantize, then prune: ``onnxprune quantized.onnx --ratio R --calib DATA`` (the quantized model's float
  view is calibrated; ``--compensate`` is refused, since it would re-quantize);
* prune, then quantize: ``onnxprune model.onnx --ratio R --calib DATA [--compensate]``, then the same
  quantizer on the pruned model.

    pip install -e .[tools] && python tools/quantized_fidelity.py [--ratios 0.25 0.5] [--forms dyn qdq-pc nbits32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import embed, export_minilm, fidelity, split_sentences, tokenize  # noqa: E402

FORMS = ("dyn", "qdq", "qdq-pc", "nbits32", "nbits128")


def quantize(src: Path, form: str, out: Path, calib: dict[str, np.ndarray]) -> Path:
    """``quantize_models.quantize``, the static quantizer calibrated on ``calib`` (32 sentences a batch)."""
    from quantize_models import quantize as by_form

    class Reader:
        def __init__(self):
            n = len(calib["input_ids"])
            self.it = iter([{k: v[i:i + 32] for k, v in calib.items()} for i in range(0, n, 32)])

        def get_next(self):
            return next(self.it, None)
    by_form(src, form, out, Reader())
    return out


def prune(src: Path, out: Path, ratio: float, data: Path, compensate: bool) -> Path:
    import subprocess
    cmd = [sys.executable, "-m", "onnxprune.cli", str(src), "--ratio", str(ratio), "--calib", str(data), "-o",
           str(out), "--force"] + (["--compensate"] if compensate else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[3:])}: {r.stderr.strip()}")
    return out


def main(argv=None) -> int:
    import logging
    logging.disable(logging.INFO)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences")
    args = ap.parse_args(argv)
    import onnx
    path, folder = export_minilm()
    calib_text, eval_text = split_sentences(args.calib, args.eval)
    calib, held_out = tokenize(folder, calib_text), tokenize(folder, eval_text)
    reference = embed(onnx.load(str(path)), held_out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "calib.npz"
        np.savez(data, **calib)

        def score(p):
            return fidelity(reference, embed(onnx.load(str(p)), held_out))
        print(f"# all-MiniLM-L6-v2 quantized and pruned; {args.calib} calibration sentences (Python docs), "
              f"{args.eval} held-out (licences); cosine and top-1 agreement with the fp32 unpruned model")
        print("| form | ratio | order | mean cosine | top-1 agreement | size MB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for ratio in args.ratios:
            pruned = prune(path, tmp / f"p{ratio}.onnx", ratio, data, False)
            compensated = prune(path, tmp / f"pc{ratio}.onnx", ratio, data, True)
            c, t = score(pruned)
            print(f"| fp32 | {ratio} | prune (`--calib`) | {c:.3f} | {t:.3f} | {pruned.stat().st_size / 1e6:.1f} |")
            c, t = score(compensated)
            print(f"| fp32 | {ratio} | prune (`--calib --compensate`) | {c:.3f} | {t:.3f} | "
                  f"{compensated.stat().st_size / 1e6:.1f} |", flush=True)
        for form in args.forms:
            t0 = time.perf_counter()
            q = quantize(path, form, tmp / f"{form}.onnx", calib)
            c, t = score(q)
            print(f"| {form} | 0 | quantize | {c:.3f} | {t:.3f} | {q.stat().st_size / 1e6:.1f} |", flush=True)
            for ratio in args.ratios:
                rows = []
                try:
                    qp = prune(q, tmp / f"{form}-qp{ratio}.onnx", ratio, data, False)
                    rows.append(("quantize, then prune (`--calib`)", qp))
                except RuntimeError as exc:
                    print(f"| {form} | {ratio} | quantize, then prune | failed: {exc} | | |")
                rows.append(("prune (`--calib`), then quantize",
                             quantize(tmp / f"p{ratio}.onnx", form, tmp / f"{form}-pq{ratio}.onnx", calib)))
                rows.append(("prune (`--calib --compensate`), then quantize",
                             quantize(tmp / f"pc{ratio}.onnx", form, tmp / f"{form}-pcq{ratio}.onnx", calib)))
                for label, p in rows:
                    c, t = score(p)
                    print(f"| {form} | {ratio} | {label} | {c:.3f} | {t:.3f} | {p.stat().st_size / 1e6:.1f} |",
                          flush=True)
            print(f"# {form}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
