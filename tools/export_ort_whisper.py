"""Make ``models/whisper-ort-decoder.onnx``: a tiny Whisper decoder as ONNX Runtime's own Whisper exporter
writes it (``onnxruntime.transformers.models.whisper.convert_to_onnx --optimize_onnx --no_beam_search_op``):
``com.microsoft.MultiHeadAttention`` for self-attention with a KV cache (``past_key_self_*`` in,
``present_key_self_*`` out) and for cross-attention, whose K/V come in as cache inputs
(``past_key_cross_*``, [B, H, 1500, D]).

ORT 1.32's Whisper exporter does not run with transformers 5, so this script wants its own environment:

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch==2.13.0 transformers==4.44.2 onnx onnxruntime sympy
    /tmp/tf4/bin/python tools/export_ort_whisper.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from manifest import record  # noqa: E402  (tools/ is on the path when a tool runs)

MODELS = Path(__file__).resolve().parent.parent / "models"


def build_hf(folder: Path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=96, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(90)}
    for i, t in enumerate(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                           "<|notimestamps|>", "<|nocaptions|>"]):
        vocab[t] = 90 + i
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)


def main() -> int:
    import onnxruntime
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "out"
        build_hf(hf)
        subprocess.run([sys.executable, "-m", "onnxruntime.transformers.models.whisper.convert_to_onnx", "-m", str(hf),
                        "--output", str(out), "--cache_dir", str(Path(tmp) / "cache"), "--optimize_onnx",
                        "--precision", "fp32", "--no_beam_search_op"], check=True, stdout=subprocess.DEVNULL)
        shutil.copy(out / "hf_decoder_fp32.onnx", MODELS / "whisper-ort-decoder.onnx")
    record({"whisper-ort-decoder.onnx": {
        "family": "Whisper decoder, ORT-exported", "exporter": "ort-whisper", "attention": "MultiHeadAttention",
        "opset": 17, "command": "python tools/export_ort_whisper.py (transformers 4.44.2)",
        "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__, "kv_cache": True,
        # layer 0's self-attention cache is read outside the attention to count the past length
        "expected_misses": 1,
    }})
    print("ok   models/whisper-ort-decoder.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
