"""A decoder big enough to show decode speed: a Llama-shaped GQA model of about 1B parameters (random
weights: speed does not depend on them), as GenAI folders made by onnxruntime-genai's model builder, fp32
and int4, and the decode benchmark of `--gqa uniform`, `--gqa group` and a cut inside the heads on them.

Shape (Llama 3.2 1B's, with a 32K vocabulary): 16 layers, hidden 2048, 32 query heads on 8 KV heads of 64,
FFN 8192, tied embeddings; 1.03B parameters, 4.1 GB in fp32. Everything is made once into
``~/.cache/onnxprune/llama-1b/`` (the Hugging Face folder is deleted once both folders exist):

    pip install -e .[tools]
    python tools/decoder_1b.py build [--int4]             # genai/ (and genai-int4/)
    python tools/decoder_1b.py prune                      # the cuts at half the attention, fp32 and int4
    python tools/decoder_1b.py bench [--batch 1 4] [--context 512 4096] [--steps 16]

``bench`` prints, for every cut, precision, batch and context, the decode tokens/s of the original and the
pruned folder measured side by side in one process (``onnxprune bench --decode``), the KV cache, the ideal
decode speed-up from the bytes read per token, and the share of it that was realised.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path.home() / ".cache" / "onnxprune" / "llama-1b"
SHAPE = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=8192,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# name: the onnxprune options of the cut; all remove half of each block's attention projections
CUTS = {
    "group": ["--ratio", "0.5", "--gqa", "group"],            # 16 heads on 4 KV groups: the cache halved
    "uniform": ["--ratio", "0.5", "--gqa", "uniform"],        # 16 heads on 8 KV groups: the cache kept
    "dims": ["--qk-dims", "0.5", "--v-dims", "0.5", "--synthetic-calib"],   # every head at 32 of 64
}


def hf_folder() -> Path:
    folder = CACHE / "hf"
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPE)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():          # small weights: random activations stay in range through 16 layers
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    tmp = folder.with_suffix(".tmp")
    model.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    _tokenizer(tmp, SHAPE["vocab_size"])
    tmp.replace(folder)
    return folder


def _tokenizer(folder: Path, vocab: int):
    """A word-level tokenizer t0 ... tN, so that the folder is complete offline."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {f"t{i}": i for i in range(vocab)}
    words["<unk>"] = 3
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="<unk>",
                                         pad_token="t0").save_pretrained(folder)


def folder(precision: str = "fp32") -> Path:
    out = CACHE / ("genai" if precision == "fp32" else f"genai-{precision}")
    if (out / "genai_config.json").exists():
        return out
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder()), "-o",
                    str(tmp), "-p", precision, "-e", "cpu", "-c", str(CACHE / "builder-cache")], check=True)
    tmp.replace(out)
    return out


def pruned(cut: str, precision: str) -> Path:
    out = CACHE / f"{cut}-{precision}"
    if (out / "genai_config.json").exists():
        return out
    subprocess.run([sys.executable, "-m", "onnxprune", str(folder(precision)), *CUTS[cut], "-o", f"{out}/",
                    "--report", str(CACHE / f"{cut}-{precision}.report.json")], check=True)
    return out


def bench(batches, contexts, steps: int, precisions, cuts, seq: int):
    rows = []
    for precision in precisions:
        for cut in cuts:
            for batch in batches:
                for context in contexts:
                    out = CACHE / f"bench-{cut}-{precision}-b{batch}-c{context}.json"
                    subprocess.run([sys.executable, "-m", "onnxprune", "bench", str(folder(precision)),
                                    str(pruned(cut, precision)), "--batch", str(batch), "--seq", str(seq),
                                    "--runs", "3", "--warmup", "1", "--decode", str(steps), "--context",
                                    str(context), "--json", str(out)], check=True)
                    r = json.loads(out.read_text())
                    d = r["decode"]
                    rows.append((precision, cut, batch, context, d["tokens_per_s"]["original"],
                                 d["tokens_per_s"]["pruned"], d["original"]["kv_bytes"], d["pruned"]["kv_bytes"],
                                 d["speedup"], d["ideal_speedup"], d["realised_gain"],
                                 d["original"]["session_bytes"], d["pruned"]["session_bytes"]))
                    print(_row(rows[-1]), flush=True)
    print("\n| precision | cut | batch | context | decode tokens/s | KV cache MB | decode speed-up | ideal (bytes) "
          "| realised | decode memory MB |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(_row(r))


def _mb(n):
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _row(r) -> str:
    precision, cut, batch, context, t0, t1, kv0, kv1, speedup, ideal, realised, m0, m1 = r
    share = "-" if realised is None else f"{100 * realised:.0f}%"
    return (f"| {precision} | {cut} | {batch} | {context} | {t0:.1f} -> {t1:.1f} | {_mb(kv0)} -> {_mb(kv1)} | "
            f"{speedup:.3f}x | {ideal:.3f}x | {share} | {_mb(m0)} -> {_mb(m1)} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--int4", action="store_true")
    p = sub.add_parser("prune")
    p.add_argument("--cut", nargs="+", default=list(CUTS), choices=list(CUTS))
    p.add_argument("--precision", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    t = sub.add_parser("bench")
    t.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    t.add_argument("--context", nargs="+", type=int, default=[512, 4096])
    t.add_argument("--steps", type=int, default=16)
    t.add_argument("--seq", type=int, default=16, help="prompt tokens per sequence timed before decode (16)")
    t.add_argument("--cut", nargs="+", default=list(CUTS), choices=list(CUTS))
    t.add_argument("--precision", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(folder("int4" if args.int4 else "fp32"))
        if (CACHE / "genai" / "genai_config.json").exists() and (CACHE / "genai-int4" / "genai_config.json").exists():
            shutil.rmtree(CACHE / "hf", ignore_errors=True)
    elif args.cmd == "prune":
        for precision in args.precision:
            for cut in args.cut:
                print(pruned(cut, precision))
    else:
        bench(args.batch, args.context, args.steps, args.precision, args.cut, args.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
