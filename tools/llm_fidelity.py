"""Perplexity of Gemma 3 270M pruned by onnxprune, on real text it was not calibrated on.

Calibration windows come from the Python documentation's prose and evaluation windows from Debian's licence
texts (``texts.py``): two unrelated sources of real English. Each configuration is pruned by the command a
user types (``onnxprune model.onnx --ratio R ...``), timed, with its peak memory (``/usr/bin/time``), then
the pruned model's perplexity on the evaluation windows, its ratio to the unpruned model's, and how often its
top-1 next token agrees with the unpruned model's are printed. Random heads are the mean of three draws.

    python tools/gemma.py export                  # once: ~/.cache/onnxprune/gemma3-270m/model.onnx
    python tools/llm_fidelity.py [--ratios 0.25 0.5] [--eval 32] [--calib 16] [--configs NAME ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma import export, next_token_nll, windows  # noqa: E402
from texts import calibration_text, evaluation_text  # noqa: E402

CONFIGS = {    # name: the prune command's options (DATA: the calibration file; SCORED: prune the model that
    # `onnxprune score --importance ablation` wrote, whose stored scores are then used)
    "weights": ["--importance", "weights"],
    "activation": ["--importance", "activation", "--calib", "DATA"],
    "ablation": ["SCORED"],
    "default --compensate": ["--calib", "DATA", "--compensate"],
    "ablation, --compensate": ["SCORED", "--calib", "DATA", "--compensate"],
    "mean-ablation, --compensate": ["--importance", "mean-ablation", "--calib", "DATA", "--compensate"],
    "--compensate bias": ["--calib", "DATA", "--compensate", "bias"],
    "--compensate refit": ["--calib", "DATA", "--compensate", "refit"],
    "global, --compensate": ["--calib", "DATA", "--compensate", "--scope", "global"],
    "weights, --no-verify": ["--importance", "weights", "--no-verify"],
    # inside the heads (every head kept: --ratio 0): MACS is the share of attention MACs that --ratio R removes
    "--v-dims 0.5 (V cache halved)": ["NOHEADS", "--v-dims", "0.5", "--calib", "DATA"],
    "--v-dims 0.5, weights only": ["NOHEADS", "--v-dims", "0.5"],
    "--v-dims 0.5 --compensate": ["NOHEADS", "--v-dims", "0.5", "--calib", "DATA", "--compensate"],
    "--v-dims 0.25 --compensate": ["NOHEADS", "--v-dims", "0.25", "--calib", "DATA", "--compensate"],
    "budget: --attention-ratio MACS": ["NOHEADS", "--attention-ratio", "MACS", "--calib", "DATA"],
    "budget: --attention-ratio MACS --multiple-of 16": ["NOHEADS", "--attention-ratio", "MACS", "--calib", "DATA",
                                                        "--multiple-of", "16"],
    # QK below the q/k norms: whole rotary pairs (the projections stay; the scores and the K cache shrink)
    "--qk-dims 0.5 (K cache halved)": ["NOHEADS", "--qk-dims", "0.5", "--calib", "DATA"],
    "--qk-dims 0.25": ["NOHEADS", "--qk-dims", "0.25", "--calib", "DATA"],
    "--qk-dims 0.5 --v-dims 0.5 (KV cache halved)": ["NOHEADS", "--qk-dims", "0.5", "--v-dims", "0.5", "--calib",
                                                     "DATA"],
}


def head_macs_share(ratio: float, heads: int = 4, kv_heads: int = 1, width: int = 640, seq: int = 128) -> float:
    """The share of Gemma 3 270M's attention MACs (per block, at ``seq``) that removing ``ratio`` of its query
    heads removes: Q, O, scores and context lose them; K and V (one KV head) stay."""
    keep = int(np.floor(heads * (1 - ratio)))
    per_head = 2 * seq * width + 2 * seq * seq        # Q and O projections, scores and context, per dimension
    total = heads * per_head + 2 * kv_heads * seq * width
    return (heads - keep) * per_head / total


def perplexity(path, ids: np.ndarray, batch: int = 4) -> tuple[float, np.ndarray]:
    """(perplexity over every predicted token, the top-1 prediction at each position)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nll, count, top = 0.0, 0, []
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        total, n, best = next_token_nll(sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0], x)
        nll, count = nll + total, count + n
        top.append(best)
    return float(np.exp(nll / count)), np.concatenate(top)


def prune(model: Path, out: Path, ratio: float, options: list[str]) -> tuple[float, float, dict]:
    """Run the CLI; (seconds, peak resident GB, its report)."""
    report = out.with_suffix(".report.json")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "onnxprune.cli", str(model), "--ratio", str(ratio),
           "-o", str(out), "--force", "--report", str(report), *options]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"onnxprune failed: {r.stderr.strip().splitlines()[-20:]}")
    return seconds, int(peak.group(1)) / 1e6 if peak else float("nan"), json.loads(report.read_text())


def attention_cut(report: dict) -> tuple[float, int]:
    """(the share of the attention MACs removed, at the report's length; the KV cache's bytes per token after)."""
    before = sum(b["macs"]["before"] for b in report["blocks"])
    after = sum(b["macs"]["after"] for b in report["blocks"])
    return 1 - after / before, report["kv_cache_bytes_per_token"]["after"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--eval", type=int, default=32, help="evaluation windows of 128 tokens")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 128 tokens")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--random", type=int, default=3, help="random head draws per ratio")
    args = ap.parse_args(argv)

    model = export()
    work = Path(tempfile.mkdtemp(prefix="llm_fidelity_"))
    held = windows(evaluation_text(), 128, args.eval)
    calib = windows(calibration_text(), 128, args.calib)
    np.savez(work / "calib.npz", input_ids=calib, attention_mask=np.ones_like(calib))
    base, base_top = perplexity(model, held)
    print(f"# Gemma 3 270M (18 blocks x 4 heads, 1 KV head), {held[:, 1:].size} evaluation tokens (licence "
          f"texts), {calib.size} calibration tokens (Python docs); unpruned perplexity {base:.2f}")
    scored = None
    if any("SCORED" in CONFIGS[c] for c in args.configs):
        scored = work / "scored.onnx"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxprune.cli", "score", str(model), "--importance", "ablation",
                        "--calib", str(work / "calib.npz"), "-o", str(scored)], check=True, capture_output=True)
        print(f"# ablation scores (onnxprune score) took {time.perf_counter() - t0:.0f} s")
    print("| ratio | heads kept | configuration | attention MACs removed | KV cache bytes per token | perplexity | "
          "x unpruned | top-1 agreement | time s | peak GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    from onnxprune import prune_model
    import onnx
    for ratio in args.ratios:
        kept = int(np.floor(4 * (1 - ratio)))
        if args.random:
            rng = np.random.default_rng(0)
            m = onnx.load(str(model))
            ppls, agree = [], []
            for _ in range(args.random):
                imp = {i: rng.random(4) for i in range(18)}
                r = prune_model(m, ratio, importance=imp, verify=False)
                onnx.save(r.model, str(work / "random.onnx"))
                p, top = perplexity(work / "random.onnx", held)
                ppls.append(p)
                agree.append(float(np.mean(top == base_top)))
            del m, r
            print(f"| {ratio} | {kept} of 4 | random heads (mean of {args.random}) | | | {np.mean(ppls):.1f} | "
                  f"{np.mean(ppls) / base:.2f} | {np.mean(agree):.3f} | | |", flush=True)
        for name in args.configs:
            macs = f"{head_macs_share(ratio):.3f}"
            opts = [str(work / "calib.npz") if o == "DATA" else macs if o == "MACS" else o
                    for o in CONFIGS[name] if o not in ("SCORED", "NOHEADS")]
            out = work / "pruned.onnx"
            if "NOHEADS" in CONFIGS[name] and "MACS" not in CONFIGS[name] and ratio != args.ratios[0]:
                continue            # the same cut at every ratio: once
            seconds, peak, report = prune(scored if "SCORED" in CONFIGS[name] else model, out,
                                          0 if "NOHEADS" in CONFIGS[name] else ratio, opts)
            share, kv = attention_cut(report)
            p, top = perplexity(out, held)
            print(f"| {ratio} | {kept} of 4 | {name} | {share:.1%} | {kv:,} | {p:.1f} | {p / base:.2f} | "
                  f"{np.mean(top == base_top):.3f} | {seconds:.0f} | {peak:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
