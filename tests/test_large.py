"""The large-model path, on small models with the size thresholds lowered: weights stay in their external
data file, the probe and the checks run without them, sessions borrow in-memory weights, and the output's
data file is written afresh while the input is never touched."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.model import dtypes as probe_module
from onnxprune.model.external import data_files
from onnxprune.probe import probe
from onnxprune.runtime import session
from onnxprune.inputs import synth_inputs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench_scale import build  # noqa: E402  (numpy and onnx only)


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(probe_module, "STAND_IN_BYTES", 1024)


def test_sessions_borrow_large_weights(small_thresholds):
    model = onnx.load(str(ROOT / "models" / "bert-ts.onnx"))
    feeds = synth_inputs(model)
    borrowed = session(model).run(None, feeds)[0]
    probe_module.STAND_IN_BYTES = 1 << 40
    plain = session(model).run(None, feeds)[0]
    assert np.array_equal(borrowed, plain)


def test_the_probe_needs_no_weights(small_thresholds):
    model = onnx.load(str(ROOT / "models" / "gpt2-ts.onnx"))
    light_shapes, light_values = probe(model)
    probe_module.STAND_IN_BYTES = 1 << 40
    shapes, values = probe(model)
    assert light_shapes == shapes
    assert values.keys() == light_values.keys()
    assert all(np.array_equal(values[k], light_values[k]) for k in values)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_external_data_model_end_to_end(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model = build(src, 0, hidden=64, heads=8, ffn=128, vocab=300, layers=3)
    before = _digest(src)
    out = tmp_path / "out"
    out.mkdir()
    run = lambda: subprocess.run([sys.executable, "-m", "onnxprune.cli", str(model), "--ratio", "0.5", "-o",
                                  f"{out}/"], capture_output=True, text=True)
    r = run()
    assert r.returncode == 0, r.stderr
    assert "max abs error 0.00e+00" in r.stdout
    assert _digest(src) == before                               # the input is never touched
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    pruned = onnx.load(str(out / "model.onnx"))                 # loads: every reference is in the new file
    q = next(i for i in pruned.graph.initializer if i.name == "l0.q.weight")
    assert list(q.dims) == [64, 32]
    size = (out / "model.onnx.data").stat().st_size
    assert run().returncode == 0                                  # again, over the first output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.1.data"]   # fresh name, old gone
    assert (out / "model.onnx.1.data").stat().st_size == size     # rewritten, not appended to
    assert onnx.load(str(out / "model.onnx")) is not None
    assert run().returncode == 0                                  # and back to the first name
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    lazy = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [f.name for f in data_files(out / "model.onnx", lazy)] == ["model.onnx.data"]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
