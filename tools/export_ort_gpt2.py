"""Make ``models/gpt2-ort-past.onnx``: a tiny GPT-2 as ONNX Runtime's own GPT-2 exporter writes it
(``onnxruntime.transformers.models.gpt2.gpt2_helper.Gpt2Helper.export_onnx``, what its ``convert_to_onnx``
runs): the plain TorchScript graph with a KV cache, ``past_i`` [2, B, H, P, D] in and ``present_i`` out.
This is the graph whose attention ORT's ``optimize_model(model_type="gpt2")`` fuses; the transformers-5
exports in ``models/`` do not fuse at all.

The model is loaded with eager attention (``convert_to_onnx`` itself would trace SDPA, which its opset 11
cannot export). ORT 1.32's GPT-2 helper does not run with transformers 5, so this script wants the same
environment as ``tools/export_ort_whisper.py``:

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch==2.13.0 transformers==4.44.2 onnx onnxruntime sympy
    /tmp/tf4/bin/python tools/export_ort_gpt2.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from manifest import record  # noqa: E402  (tools/ is on the path when a tool runs)

MODELS = Path(__file__).resolve().parent.parent / "models"
NAME = "gpt2-ort-past.onnx"


def main() -> int:
    import numpy as np
    import onnxruntime
    import torch
    import transformers
    from onnxruntime.transformers.models.gpt2.gpt2_helper import Gpt2Helper, MyGPT2LMHeadModel

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(tmp)
        model = MyGPT2LMHeadModel.from_pretrained(tmp, attn_implementation="eager").eval()
    Gpt2Helper.export_onnx(model, torch.device("cpu"), str(MODELS / NAME))

    # the export against PyTorch, on a decode step with a past of 3
    batch, past, seq = 2, 3, 2
    inputs = Gpt2Helper.get_dummy_inputs(batch, past, seq, 4, 32, 2, 100, torch.device("cpu"), float16=False,
                                         input_ids_dtype=torch.int32, position_ids_dtype=torch.int32,
                                         attention_mask_dtype=torch.int32)
    with torch.no_grad():
        expected = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, *inputs.past)[0].numpy()
    feeds = {"input_ids": inputs.input_ids.numpy(), "position_ids": inputs.position_ids.numpy(),
             "attention_mask": inputs.attention_mask.numpy()}
    feeds.update({f"past_{i}": p.numpy() for i, p in enumerate(inputs.past)})
    got = onnxruntime.InferenceSession(str(MODELS / NAME), providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    error = float(np.max(np.abs(got[0] - expected)))
    assert error < 1e-4, error

    record({NAME: {
        "family": "GPT-2, ORT-exported", "exporter": "ort-gpt2", "attention": "eager (MatMul/Softmax)",
        "opset": 11, "command": "python tools/export_ort_gpt2.py (transformers 4.44.2)",
        "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__, "kv_cache": True,
    }})
    print(f"ok   models/{NAME} (max abs error against torch {error:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
