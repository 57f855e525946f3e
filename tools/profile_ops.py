"""Where the time goes, before and after pruning: ONNX Runtime's profiler, summed by operator type.

When a pruned model falls short of its ideal speed-up, this says which operators did not shrink. Both
models run on the same provider and inputs as ``onnxprune bench`` (graph optimizations on, so the fused
operators are the ones deployed), with ORT's profiling on, and the node events of the timed runs are summed
per operator type. With ``--context C`` the timed runs are decode steps, as ``onnxprune bench --decode`` times
them: one new token per sequence against a KV cache filled to C tokens.

    python tools/profile_ops.py ORIGINAL PRUNED [--provider cpu|cuda] [--batch 4] [--seq 256] [--runs 20]
    python tools/profile_ops.py ORIGINAL PRUNED --context 4096 [--batch 4]     # a model with a KV cache
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.bench import (PROVIDERS, Runner, decode_inputs, graph_of, inputs_for,  # noqa: E402
                             session_options)


def profile(path: Path, provider: str, batch: int, seq: int, runs: int, warmup: int, threads,
            context: int | None = None) -> dict[str, float]:
    """Microseconds per timed run, by operator type (ORT's node kernel events after the warm-up runs); with
    ``context``, per decode step against a cache of that many tokens."""
    import onnxruntime as ort
    opts = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), opts, providers=PROVIDERS[provider])
        graph = graph_of(path)
        feeds = decode_inputs(graph, batch, context) if context else inputs_for(graph, batch, seq, None)
        run = Runner(sess, feeds, provider != "cpu")
        for _ in range(warmup + runs):
            run()
        events = _events(sess.end_profiling())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after = starts[warmup] if len(starts) > warmup else 0
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            per_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    return {op: us / runs for op, us in per_op.items()}


def _events(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("pruned", type=Path)
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=None, help="time decode steps against a cache of this many tokens")
    args = ap.parse_args(argv)
    before, after = (profile(p, args.provider, args.batch, args.seq, args.runs, args.warmup, args.threads,
                             args.context) for p in (args.original, args.pruned))
    total_b, total_a = sum(before.values()), sum(after.values())
    what = f"a decode step at context {args.context}" if args.context else f"seq {args.seq}"
    print(f"operator time per run, {args.provider}, batch {args.batch}, {what} (ORT profiler, node events)")
    print("| operator | original us | pruned us | ratio | share of original | share of the time saved |")
    print("| --- | --- | --- | --- | --- | --- |")
    saved = max(total_b - total_a, 1e-9)
    for op in sorted(set(before) | set(after), key=lambda o: -before.get(o, 0)):
        b, a = before.get(op, 0.0), after.get(op, 0.0)
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"| {op} | {b:.0f} | {a:.0f} | {ratio} | {100 * b / total_b:.1f}% | {100 * (b - a) / saved:.1f}% |")
    print(f"| all nodes | {total_b:.0f} | {total_a:.0f} | {total_b / max(total_a, 1e-9):.2f} | 100% | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
