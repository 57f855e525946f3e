"""Large models that hold their weights in the .onnx file: read as a skeleton of their own file and written
back whole, streaming the weights (``onnxprune/model/inline.py``). The thresholds are lowered so that the small
models of ``models/`` take this path."""

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.model import inline
from onnxprune import prune_model
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.inputs import synth_inputs
from onnxprune.verify import run

from conftest import MODELS

BERT = MODELS / "bert-ts.onnx"


def _weights(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_a_skeleton_leaves_large_tensors_in_the_file_and_writes_back_the_same_model(tmp_path):
    sk = inline.skeleton(BERT, large=1024)
    moved = [t for t in sk.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert moved and sk.ByteSize() < BERT.stat().st_size / 2
    assert inline.self_contained(sk, BERT)
    inline.write_inline(sk, tmp_path / "back.onnx", MODELS)
    back = onnx.load(str(tmp_path / "back.onnx"))
    onnx.checker.check_model(back, full_check=True)
    want, got = _weights(onnx.load(str(BERT))), _weights(back)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    feeds = synth_inputs(back)
    assert np.array_equal(run(onnx.load(str(BERT)), feeds)["last_hidden_state"], run(back, feeds)["last_hidden_state"])
    # the file written in pieces (a graph message per large tensor) reads as a skeleton again
    again = inline.skeleton(tmp_path / "back.onnx", large=1024)
    assert sorted(t.name for t in again.graph.initializer) == sorted(want)


def test_a_source_shorter_than_its_tensors_is_an_error(tmp_path):
    shutil.copy(BERT, tmp_path / "m.onnx")
    sk = inline.skeleton(tmp_path / "m.onnx", large=1024)
    with open(tmp_path / "m.onnx", "r+b") as f:
        f.truncate(BERT.stat().st_size // 2)
    with pytest.raises(InputError, match="shorter than tensor"):
        inline.write_inline(sk, tmp_path / "out.onnx", tmp_path)


def test_the_command_line_prunes_a_large_self_contained_model_in_its_form(tmp_path, monkeypatch, capsys):
    """As for a model of a gigabyte: read as a skeleton, pruned and verified with the weights on disk, and
    written as one file again (no data file), equal to the model pruned in memory; the input untouched."""
    monkeypatch.setattr(inline, "SKELETON_FROM", 1)
    monkeypatch.setattr(inline, "LARGE", 1024)
    shutil.copy(BERT, tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    assert main([str(tmp_path / "m.onnx"), "--ratio", "0.5", "-o", str(tmp_path / "out.onnx")]) == 0
    assert "pruned == masked original" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]     # no data file
    assert (tmp_path / "m.onnx").read_bytes() == before
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    want = prune_model(onnx.load(str(BERT)), 0.5).model
    a, b = _weights(want), _weights(out)
    assert sum(v.size for v in a.values()) == sum(v.size for v in b.values())
    feeds = synth_inputs(out, seed=5)
    assert np.array_equal(run(want, feeds)["last_hidden_state"], run(out, feeds)["last_hidden_state"])


def test_a_compensated_model_is_verified_as_saved_against_its_compensated_original(tmp_path, monkeypatch,
                                                                                  capsys):
    """With weights on disk the written model is verified from the file (``verify_saved``): against the
    original with the same compensation, masked (it compared with the uncompensated original, and failed)."""
    monkeypatch.setattr(inline, "SKELETON_FROM", 1)
    monkeypatch.setattr(inline, "LARGE", 1024)
    shutil.copy(BERT, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **synth_inputs(onnx.load(str(BERT)), seed=2, batch=24, seq=9))
    assert main([str(tmp_path / "m.onnx"), "--ratio", "0.5", "--calib", str(tmp_path / "c.npz"), "--compensate",
                 "-o", str(tmp_path / "out.onnx")]) == 0
    assert "pruned == masked original: max abs error 0.00e+00" in capsys.readouterr().out
