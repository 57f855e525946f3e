"""Hugging Face Optimum's ONNX exports of small decoders, the form most ONNX LLMs on the Hub come in:
``optimum.exporters.onnx.main_export(..., task="text-generation-with-past")`` writes one ``model.onnx``
with a KV cache (``past_key_values.N.key/value`` in, ``present.N.key/value`` out, a mask whose length is
named ``past_sequence_length + sequence_length``), and ``task="text-generation"`` the same without it.

Optimum needs transformers < 4.58, so this runs in an environment of its own (not the ``tools`` extra):

    python3 -m venv /tmp/optvenv && . /tmp/optvenv/bin/activate
    pip install "torch==2.13.0" "transformers<4.58" "optimum-onnx==0.1.0" onnx onnxruntime
    python tools/export_optimum.py [NAME ...]      # writes models/optimum-*.onnx and records them
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
from pathlib import Path

from manifest import record  # noqa: E402  (tools/ is on the path when a tool runs)

MODELS = Path(__file__).resolve().parent.parent / "models"
SMALL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
             vocab_size=64, num_attention_heads=8, num_key_value_heads=2)
SPECS = {   # name: (config class, model family, extra config)
    "llama": ("LlamaConfig", "Llama, Optimum", {}),
    "qwen3": ("Qwen3Config", "Qwen3, Optimum", dict(head_dim=8)),
    # q/k RMSNorm, sliding-window layers and a scaled embedding; Optimum exports it as "gemma3_text"
    "gemma3": ("Gemma3TextConfig", "Gemma 3, Optimum", dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=8)),
}


def export(name: str, task: str, out: Path) -> Path:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    cfg_cls, _, extra = SPECS[name]
    config = getattr(transformers, cfg_cls)(**SMALL, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():          # random biases and norms too: a wrong slice must show
            p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        onnx_dir = Path(tmp) / "onnx"
        main_export(tmp, onnx_dir, task=task, opset=18, do_validation=False, no_post_process=True)
        suffix = "past" if task.endswith("with-past") else "nopast"
        path = out / f"optimum-{name}-{suffix}.onnx"
        shutil.copy(onnx_dir / "model.onnx", path)
    return path


def main(argv=None) -> int:
    from importlib.metadata import version

    import onnx
    import torch
    import transformers
    entries = {}
    only = (argv if argv is not None else sys.argv[1:]) or list(SPECS)
    for name, (_, family, _) in ((n, SPECS[n]) for n in only):
        for task in ("text-generation-with-past", "text-generation"):
            path = export(name, task, MODELS)
            entries[path.name] = {"family": family, "exporter": "optimum", "opset": 18, "kv_cache": "past" in task,
                                  "command": "python tools/export_optimum.py (its own environment, see the file)",
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "optimum-onnx": version("optimum-onnx")}
            print(f"ok   {path.name:32} {path.stat().st_size / 1024:7.1f} KiB")
    record(entries, None)
    print(f"python {platform.python_version()}, onnx {onnx.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
