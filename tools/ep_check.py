"""Run pruned models on an ONNX Runtime execution provider and check them against the CPU.

For each model: prune it (ratio 0.5, verified on the CPU as usual), then run the pruned model on the
chosen provider and on the CPU, with the same synthetic inputs, and report the largest difference.
Also runs the masked original on the provider, so that a provider-side difference in the pruned model
can be told apart from a provider-side difference in the model itself, and compares the pruned model with
the masked original on the provider itself (pruning equals masking there too, within its arithmetic).

    python tools/ep_check.py --provider cuda
    python tools/ep_check.py --provider tensorrt --json out.json
    python tools/ep_check.py --provider cpu          # a dry run of the tool itself

Needs ``onnxruntime-gpu`` in place of ``onnxruntime`` for cuda and tensorrt (never both installed).
Results go to ``docs/gpu.md`` with the date and the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune import prune_model  # noqa: E402
from onnxprune.inputs import synth_inputs  # noqa: E402
from onnxprune.verify import kept_heads_only, masked_model  # noqa: E402

MODELS = ["bert-ts.onnx", "bert-d23-sdpa.onnx", "bert-ort-attention.onnx", "bert-ort-attention-fp16.onnx",
          "bert-ort-mha.onnx", "llama-d18.onnx", "gpt2-d18.onnx", "gpt2-ort-past.onnx", "llama-genai/model.onnx"]
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def run(model: onnx.ModelProto, feeds: dict, providers: list[str]) -> tuple[dict, list[str]]:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=providers)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds))), sess.get_providers()


def diff(a: dict, b: dict) -> float:
    """The largest difference over the outputs both have with the same shape (a KV cache's outputs differ
    in shape between a pruned and a masked model; the CPU check compares those on the kept heads)."""
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
               for k in a if k in b and a[k].shape == b[k].shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    providers = PROVIDERS[args.provider]
    if providers[0] not in ort.get_available_providers():
        print(f"{providers[0]} is not available here (onnxruntime {ort.__version__}: "
              f"{', '.join(ort.get_available_providers())})", file=sys.stderr)
        return 2
    rows = []
    print(f"{'model':32}{'provider used':28}{'pruned vs CPU':>15}{'masked vs CPU':>15}{'pruned vs masked':>18}"
          f"{'cpu pruning err':>16}")
    for name in args.models:
        model = onnx.load(str(ROOT / "models" / name))
        t = time.perf_counter()
        result = prune_model(model, 0.5)
        feeds = synth_inputs(model)
        pruned_feeds = kept_heads_only(feeds, result.io_keep)
        on_ep, used = run(result.model, pruned_feeds, providers)
        on_cpu, _ = run(result.model, pruned_feeds, PROVIDERS["cpu"])
        masked = masked_model(model, list(result.blocks), result.kept)
        masked_ep, _ = run(masked, feeds, providers)
        masked_cpu, _ = run(masked, feeds, PROVIDERS["cpu"])
        row = {"model": name, "provider": used[0], "pruned_vs_cpu": diff(on_ep, on_cpu),
               "masked_vs_cpu": diff(masked_ep, masked_cpu), "pruned_vs_masked_on_provider": diff(on_ep, masked_ep),
               "cpu_max_error": result.max_error,
               "seconds": round(time.perf_counter() - t, 2)}
        rows.append(row)
        print(f"{name:32}{row['provider']:28}{row['pruned_vs_cpu']:15.2e}{row['masked_vs_cpu']:15.2e}"
              f"{row['pruned_vs_masked_on_provider']:18.2e}{row['cpu_max_error']:16.2e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
