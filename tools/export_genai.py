"""Make ``models/llama-genai*/``: a tiny Llama built by ONNX Runtime GenAI's model builder, with a packed
QKV projection, with separate ones (``disable_qkv_fusion=true``), and in fp16 for DirectML (separate Q/K/V
and a ``com.microsoft.RotaryEmbedding`` op in front of GroupQueryAttention).

The builder writes the deployment graph that ``onnxruntime_genai`` runs: a packed QKV MatMul feeding
``com.microsoft.GroupQueryAttention`` with RoPE inside, a KV cache as graph inputs ``past_key_values.*``
and outputs ``present.*``, weights in external data, and ``genai_config.json``. Needs the ``tools`` extra
and ``onnxruntime-genai``:

    python tools/export_genai.py [--only int4]

The config is tiny and random: 8 query heads and 2 KV heads of size 16 (the CPU GroupQueryAttention
kernel wants head sizes that are multiples of 16), 2 layers. The vocabulary (96) differs from every
other width on purpose: the builder takes a Linear whose width is the vocabulary for the LM head.
A word-level tokenizer ``t0 ... t95`` is written beside it, so that the folder is complete offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from manifest import record  # noqa: E402  (tools/ is on the path when a tool runs)

MODELS = Path(__file__).resolve().parent.parent / "models"
# name: (precision, execution provider, extra builder options[, the Llama's heads of 32 instead of 16])
VARIANTS = {
    "llama-genai": ("fp32", "cpu", []),
    "llama-genai-separate": ("fp32", "cpu", ["--extra_options", "disable_qkv_fusion=true"]),
    # for DirectML the builder writes separate Q/K/V and a com.microsoft.RotaryEmbedding before the attention
    "llama-genai-dml-fp16": ("fp16", "dml", []),
    # int4 for CPU: MatMulNBits (blocks of 32 rows, which span two heads of 16) for every projection
    "llama-genai-int4": ("int4", "cpu", []),
    # 4 query and 2 KV heads of 32: a cut inside the heads keeps 16 (the CPU kernel's RoPE wants multiples of 16)
    "llama-genai-d32": ("fp32", "cpu", [], True),
    # Gemma 3 as its 270M is built: one KV head for 4 query heads of 64 (cuts keep 16, 32 or 48), q/k norms
    # written as fused SimplifiedLayerNormalization over [B, S*H, D] between a split packed QKV and the attention, local and
    # global RoPE caches, a sliding window of 8 on the first layer
    "gemma3-genai": ("fp32", "cpu", [], "gemma3"),
    # the same in int4: MatMulNBits blocks of 32 rows over heads of 64, so a cut inside the heads that keeps
    # positions (whole rotary pairs, V positions in runs of 16) needs no re-quantization
    "gemma3-genai-int4": ("int4", "cpu", [], "gemma3"),
}


def build_hf(folder: Path, kind=False):
    """A random Llama (heads of 16; of 32 when ``kind`` is True) or Gemma 3 (``kind == "gemma3"``) and its
    word-level tokenizer, saved as a Hugging Face folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=128, num_attention_heads=4,
                                            num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                                            intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, num_attention_heads=4 if kind else 8,
                                       num_key_value_heads=2,
                                       intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
        if kind == "gemma3":        # its tied embedding, scaled by sqrt(hidden), would else outweigh every layer
            model.model.embed_tokens.weight.mul_(0.1)   # and greedy decoding only repeat the last token
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(96)}
    vocab["<unk>"] = 3
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="<unk>",
                                         pad_token="t0").save_pretrained(folder)


def main(argv=None) -> int:
    import argparse

    import onnx
    import onnxruntime_genai
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="variants whose name contains this")
    args = ap.parse_args(argv)
    entries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (precision, ep, extra, *kind) in VARIANTS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            kind = kind[0] if kind else False
            hf = Path(tmp) / {False: "hf", True: "hf-wide"}.get(kind, f"hf-{kind}")
            if not hf.exists():
                build_hf(hf, kind)
            out, dest = Path(tmp) / name, MODELS / name
            if kind == "gemma3":        # the builder needs Gemma 3's config flattened (tools/gemma.py)
                from gemma import build
                build(hf, out, precision, Path(tmp) / "cache", extra)
            else:
                subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                                str(out), "-p", precision, "-e", ep, "-c", str(Path(tmp) / "cache"), *extra],
                               check=True, stdout=subprocess.DEVNULL)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(out, dest)
            opset = next(o.version for o in onnx.load(str(dest / "model.onnx"), load_external_data=False).opset_import
                         if o.domain in ("", "ai.onnx"))
            entries[f"{name}/model.onnx"] = {
                "family": {True: "Llama, GenAI heads of 32", "gemma3": "Gemma 3, multi-query"}.get(kind, "Llama"), "exporter": "genai-builder", "attention": "GroupQueryAttention", "opset": opset,
                "command": "python tools/export_genai.py", "builder_options": " ".join(["-p", precision, "-e", ep, *extra]),
                "onnxruntime-genai": onnxruntime_genai.__version__, "kv_cache": True,
            }
            print(f"ok   models/{name}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
    record(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
