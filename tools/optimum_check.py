"""Optimum's own client on pruned Optimum folders: a Llama-shaped decoder with a KV cache (8 query heads on 4 KV
groups, head size 32) and a BERT encoder are exported by ``optimum.exporters.onnx.main_export`` into folders
(model.onnx beside config.json), pruned by the folder form (``onnxprune DIR/ --ratio 0.5 -o OUT/``: with
``--gqa group`` and ``--gqa uniform`` for the decoder), and loaded by ``ORTModelForCausalLM`` and
``ORTModelForFeatureExtraction``. Each is compared with the masked original (the dropped heads' output rows
zeroed, written into a copy of the original folder) run by the same class: the greedy tokens of ``generate``
must be the same, and the embeddings within 1e-4.

Optimum needs transformers < 4.58, so this runs in an environment of its own (not the ``tools`` extra):

    python3 -m venv /tmp/optvenv && . /tmp/optvenv/bin/activate
    pip install "torch==2.13.0" "transformers<4.58" "optimum-onnx[onnxruntime]==0.1.0" -e .
    python tools/optimum_check.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _export(kind: str, out: Path) -> Path:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=128,
                                          max_position_embeddings=128)
        model, task = transformers.LlamaForCausalLM(config), "text-generation-with-past"
    else:
        config = transformers.BertConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=8, vocab_size=128, max_position_embeddings=128)
        model, task = transformers.BertModel(config), "feature-extraction"
    with torch.no_grad():
        for p in model.parameters():     # random norms and biases too, so that a wrong slice shows
            p.add_(torch.randn_like(p) * 0.05)
    src = out / f"{kind}-hf"
    model.save_pretrained(src)
    main_export(str(src), out / kind, task=task, opset=18, do_validation=False, no_post_process=True)
    return out / kind


def _prune(folder: Path, out: Path, *flags: str) -> dict:
    report = out.with_suffix(".json")
    r = subprocess.run([sys.executable, "-m", "onnxprune", str(folder), "--ratio", "0.5", *flags, "-o",
                        str(out) + "/", "--report", str(report)], capture_output=True, text=True)
    print(r.stdout.strip().splitlines()[-3:] if r.returncode == 0 else r.stderr.strip())
    if r.returncode:
        raise SystemExit(f"onnxprune failed on {folder} {flags}")
    return json.loads(report.read_text())


def _masked(folder: Path, report: dict, out: Path) -> Path:
    """A copy of the original folder whose model has the dropped heads masked (the proof's reference)."""
    import onnx
    from onnxprune.api import inspect_model
    from onnxprune.verify import masked_model
    shutil.copytree(folder, out)
    model = onnx.load(str(folder / "model.onnx"))
    blocks = inspect_model(model).blocks
    kept = {i: b["kept_heads"] for i, b in enumerate(report["blocks"])}     # blocks in graph order
    onnx.save(masked_model(model, list(blocks), kept), str(out / "model.onnx"))
    return out


def _generate(folder: Path, ids) -> list[int]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True)
    out = model.generate(torch.tensor(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
    return out[:, len(ids[0]):].tolist()


def _embed(folder: Path, ids) -> np.ndarray:
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    model = ORTModelForFeatureExtraction.from_pretrained(folder)
    t = torch.tensor(ids)
    return model(input_ids=t, attention_mask=torch.ones_like(t), token_type_ids=torch.zeros_like(t)) \
        .last_hidden_state.detach().numpy()


def main() -> int:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (2, 12)).tolist()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        llama = _export("llama", tmp)
        for gqa in ("group", "uniform"):
            report = _prune(llama, tmp / f"llama-{gqa}", "--gqa", gqa)
            heads = [(len(b["kept_heads"]), len(b["kept_kv_heads"])) for b in report["blocks"]]
            pruned = _generate(tmp / f"llama-{gqa}", ids)
            masked = _generate(_masked(llama, report, tmp / f"llama-{gqa}-masked"), ids)
            same = pruned == masked
            failed += not same
            print(f"{'ok' if same else 'FAIL':4} llama --gqa {gqa}: (query, KV) heads kept {heads[0]}; greedy "
                  f"tokens of ORTModelForCausalLM, pruned == masked: {same} ({pruned[0][:8]}...)")
        bert = _export("bert", tmp)
        report = _prune(bert, tmp / "bert-pruned")
        pruned, masked = _embed(tmp / "bert-pruned", ids), _embed(_masked(bert, report, tmp / "bert-masked"), ids)
        err = float(np.abs(pruned - masked).max())
        failed += not err <= 1e-4
        print(f"{'ok' if err <= 1e-4 else 'FAIL':4} bert: ORTModelForFeatureExtraction, pruned vs masked "
              f"max abs error {err:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
