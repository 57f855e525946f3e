"""The Olive pass (``onnxprune.olive``) in real Olive workflows: ``olive run`` with the package config that
``python -m onnxprune.olive`` writes prunes and then quantizes a model from ``models/`` (the README's
example workflow), an Olive data config drives the calibration, a model folder comes out as a pruned
folder, and onnxprune's refusals stop the workflow with their own one-line reason. Skipped only where
``olive-ai`` is not installed (``pip install "onnxprune[olive]"``)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")      # no usage reports from the tests
if importlib.util.find_spec("olive") is None:       # skipped only when absent: a broken install fails
    pytest.skip("olive-ai is not installed (pip install \"onnxprune[olive]\")", allow_module_level=True)

from onnxprune.api import inspect_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "olive" / "prune_then_quantize.json"


def _workflow(tmp_path, passes, model=None) -> dict:
    cfg = json.loads(EXAMPLE.read_text())
    cfg["input_model"] = model or {"type": "ONNXModel", "model_path": str(ROOT / "models" / "bert-ts.onnx")}
    cfg["passes"] = passes
    cfg.update(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    return cfg


def _run(cfg):
    from olive.workflows import run
    from onnxprune.olive import package_config
    return run(cfg, package_config=package_config())


def _reports(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "cache").rglob("onnxprune_report.json"))]


def _feeds(batch=2, seq=16):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, 64, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64)}


def test_the_package_config_adds_the_pass_to_olives_own(tmp_path):
    out = tmp_path / "pkg.json"
    r = subprocess.run([sys.executable, "-m", "onnxprune.olive", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    passes = json.loads(out.read_text())["passes"]
    assert passes["OnnxPrune"]["module_path"] == "onnxprune.olive.OnnxPrune"
    assert "OnnxDynamicQuantization" in passes and "OrtTransformersOptimization" in passes   # Olive's, kept


def test_olive_run_prunes_then_quantizes_the_readme_workflow(tmp_path):
    """The shipped example, run by the ``olive`` command as the README shows it."""
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "bert-ts.onnx", tmp_path / "models")
    shutil.copy(EXAMPLE, tmp_path)
    r = subprocess.run([sys.executable, "-m", "onnxprune.olive", "-o", "olive_config.json"], cwd=tmp_path)
    assert r.returncode == 0
    olive = Path(sys.executable).with_name("olive")
    r = subprocess.run([str(olive), "run", "--config", EXAMPLE.name, "--package-config", "olive_config.json"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "pruned == masked original: max abs error 0.00e+00" in r.stdout
    final = onnx.load(str(tmp_path / "olive-out" / "model.onnx"))
    ops = {n.op_type for n in final.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops          # quantized after the prune
    blocks = inspect_model(final).blocks
    assert [b.num_heads for b in blocks] == [2, 2]                            # of 4: ratio 0.5
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "olive-cache").rglob("onnxprune_report.json")]
    assert [b["kept_heads"] for b in report["blocks"]] == [[1, 3], [0, 2]]
    out = ort.InferenceSession(str(tmp_path / "olive-out" / "model.onnx")).run(None, _feeds())[0]
    assert np.isfinite(out).all()


def test_a_data_config_calibrates_the_prune(tmp_path):
    data = {"name": "calib", "type": "DummyDataContainer",
            "load_dataset_config": {"input_shapes": [[4, 16]] * 3, "max_samples": 12,
                                    "input_names": ["input_ids", "attention_mask", "token_type_ids"],
                                    "input_types": ["int64"] * 3}}
    _run(_workflow(tmp_path, {"prune": {"type": "OnnxPrune", "ratio": 0.5, "importance": "activation",
                                        "compensate": "refit", "data_config": data}}))
    (report,) = _reports(tmp_path)
    assert report["importance"] == "activation" and report["compensate"] == "refit"
    assert report["max_error"] <= 1e-4


def test_a_model_folder_comes_out_as_a_pruned_folder(tmp_path):
    folder = ROOT / "models" / "llama-genai"
    model = {"type": "ONNXModel", "model_path": str(folder), "onnx_file_name": "model.onnx"}
    _run(_workflow(tmp_path, {"prune": {"type": "OnnxPrune", "ratio": 0.5, "gqa": "uniform"}}, model))
    (out,) = [p.parent for p in (tmp_path / "out").rglob("genai_config.json")]
    before = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    after = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert after["num_attention_heads"] == before["num_attention_heads"] // 2
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert inspect_model(onnx.load(str(out / "model.onnx"))).blocks[0].num_heads == after["num_attention_heads"]


def test_a_refusal_stops_the_workflow_with_onnxprunes_reason(tmp_path):
    from onnxprune.olive import PruneFailed
    with pytest.raises(PruneFailed, match=r"^OnnxPrune: argument --ratio: ratio must lie in \[0, 1\], got 1.5$"):
        _run(_workflow(tmp_path, {"prune": {"type": "OnnxPrune", "ratio": 1.5}}))
    assert not (tmp_path / "out" / "model.onnx").exists()
    with pytest.raises(PruneFailed, match="attention-ratio measures each cut on calibration data") as info:
        _run(_workflow(tmp_path, {"prune": {"type": "OnnxPrune", "attention_ratio": 0.5}}))
    assert info.value.exit_code == 4
    with pytest.raises(PruneFailed, match="calib or data_config"):
        _run(_workflow(tmp_path, {"prune": {"type": "OnnxPrune", "ratio": 0.5, "calib": "x.npz",
                                            "data_config": {"name": "d", "type": "DummyDataContainer"}}}))
