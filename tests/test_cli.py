"""The command line as a user runs it: a subprocess, one-line errors, no stray files."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, cli, plant_in_rewrite
from onnxprune.cli import main

BERT = MODELS / "bert-ts.onnx"


@pytest.fixture
def work(tmp_path):
    shutil.copy(BERT, tmp_path / "bert.onnx")
    return tmp_path


def test_prune_writes_model_and_report(work):
    r = cli(work / "bert.onnx", "--ratio", "0.5", "--report", work / "r.json")
    assert r.returncode == 0, r.stderr
    out = work / "bert.pruned.onnx"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask     # like any file the user writes, not 0600
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    report = json.loads((work / "r.json").read_text())
    assert set(report) >= {"model", "output", "ratio", "params_before", "params_after", "blocks"}
    assert report["params_after"] < report["params_before"] and report["ratio"] == 0.5
    for b in report["blocks"]:
        assert b["num_heads"] == 4 and len(b["kept_heads"]) == 2 and b["kept_heads"] == sorted(b["kept_heads"])
        assert set(b) >= {"name", "family", "num_kv_heads", "head_dim", "kept_kv_heads", "o_proj"}
        assert b["o_proj"]["initializer"] in {i.name for i in onnx.load(str(BERT)).graph.initializer}
    assert "max abs error" in r.stdout


def test_heads_to_prune_file(work):
    (work / "h.json").write_text(json.dumps({"0": [0, 3], "1": [1]}))
    r = cli(work / "bert.onnx", "--heads-to-prune", work / "h.json", "-o", work / "o.onnx", "--report",
            work / "r.json")
    assert r.returncode == 0, r.stderr
    blocks = json.loads((work / "r.json").read_text())["blocks"]
    assert blocks[0]["kept_heads"] == [1, 2] and blocks[1]["kept_heads"] == [0, 2, 3]


def test_dry_run_writes_nothing(work):
    r = cli(work / "bert.onnx", "--ratio", "0.5", "--dry-run")
    assert r.returncode == 0 and sorted(p.name for p in work.iterdir()) == ["bert.onnx"]


def test_inspect(work):
    r = cli("inspect", work / "bert.onnx")
    assert r.returncode == 0 and "2 attention blocks" in r.stdout
    data = json.loads(cli("inspect", work / "bert.onnx", "--json").stdout)
    assert len(data["blocks"]) == 2 and data["blocks"][0]["num_heads"] == 4


def test_inspect_explains_a_miss(tmp_path):
    """A Softmax whose result reaches no output projection is named with the reason it is not matched."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 5])
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"]),
             helper.make_node("Transpose", ["x"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["y"], axis=-1, name="scores_softmax")]
    g = helper.make_graph(nodes, "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    r = cli("inspect", tmp_path / "m.onnx")
    assert r.returncode == 3
    assert "scores_softmax" in r.stdout and "found 0" in r.stdout and "output projection" in r.stdout


def _no_attention(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("case", ["missing", "truncated", "not_onnx", "ratio_nan", "ratio_range", "ratio_word",
                                  "no_attention", "overwrite", "bad_dir", "empty", "bad_heads"])
def test_bad_input_is_one_line_and_writes_nothing(work, case):
    model = work / "bert.onnx"
    args = [model, "--ratio", "0.5"]
    if case == "missing":
        args[0] = work / "nope.onnx"
    elif case == "truncated":
        (work / "t.onnx").write_bytes(BERT.read_bytes()[: 5000])
        args[0] = work / "t.onnx"
    elif case == "not_onnx":
        (work / "n.onnx").write_text("hello, I am not a model\n" * 20)
        args[0] = work / "n.onnx"
    elif case == "empty":
        (work / "e.onnx").write_bytes(b"")
        args[0] = work / "e.onnx"
    elif case == "ratio_nan":
        args[2] = "nan"
    elif case == "ratio_range":
        args[2] = "1.5"
    elif case == "ratio_word":
        args[2] = "half"
    elif case == "no_attention":
        _no_attention(work / "relu.onnx")
        args[0] = work / "relu.onnx"
    elif case == "overwrite":
        args += ["-o", model]
    elif case == "bad_dir":
        args += ["-o", work / "bert.onnx" / "out.onnx"]
    elif case == "bad_heads":
        (work / "h.json").write_text('{"0": [7]}')
        args = [model, "--heads-to-prune", work / "h.json"]
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    r = cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


def test_help_teaches():
    r = cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "inspect" in r.stdout


def test_a_file_output_elsewhere_copies_nothing_else(work, tmp_path_factory):
    (work / "notes.txt").write_text("not part of the model")
    other = tmp_path_factory.mktemp("other")
    r = cli(work / "bert.onnx", "--ratio", "0.5", "-o", other / "small.onnx")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in other.iterdir()] == ["small.onnx"]


def test_a_folder_output_is_made_and_holds_the_folder(work, tmp_path_factory):
    (work / "notes.txt").write_text("tokenizer and the like")
    dest = tmp_path_factory.mktemp("other") / "pruned"
    r = cli(work / "bert.onnx", "--ratio", "0.5", "-o", f"{dest}/")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["bert.onnx", "notes.txt"]


def test_a_failed_folder_output_leaves_no_folder(work, tmp_path_factory, monkeypatch):
    """A rewrite that slices a weight wrongly (planted: one projection shifted) fails verification; the
    folder made for the output is gone again."""
    plant_in_rewrite(monkeypatch, lambda w: w + 0.5)
    dest = tmp_path_factory.mktemp("other") / "pruned"
    assert main([str(work / "bert.onnx"), "--ratio", "0.5", "-o", f"{dest}/"]) == 6
    assert not dest.exists()
    assert main([str(work / "bert.onnx"), "--ratio", "0.5", "-o", f"{dest}/", "--atol", "-1"]) == 2   # refused


def test_the_summary_names_what_was_left_whole(tmp_path):
    """ORT's Whisper decoder leaves one block whole (its cache is read outside it): the prune command says
    so and names it, the report lists it, and --strict refuses the model. Ratio 0 says nothing was removed."""
    model = MODELS / "whisper-ort-decoder.onnx"
    r = cli(model, "--ratio", "0.5", "--dry-run", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "left whole: 1 attention-like node(s) not matched" in r.stdout and "Attention_0" in r.stdout
    misses = json.loads((tmp_path / "r.json").read_text())["misses"]
    assert [m["node"] for m in misses] == ["Attention_0"] and "outside the block" in misses[0]["reason"]
    r = cli(model, "--ratio", "0.5", "-o", tmp_path / "p.onnx", "--strict")
    assert r.returncode == 3 and "--strict" in r.stderr and not (tmp_path / "p.onnx").exists()
    r = cli(BERT, "--ratio", "0", "--dry-run")
    assert r.returncode == 0 and "nothing removed" in r.stdout and "left whole" not in r.stdout


def test_nodes_out_of_order_are_sorted_not_refused(tmp_path):
    """ORT's float16 converter (keep_io_types) can write nodes out of topological order, which ORT runs and
    the ONNX checker refuses: the graph is sorted in memory, the input file left as it is."""
    model = onnx.load(str(BERT))
    nodes = list(model.graph.node)
    nodes[5], nodes[20] = nodes[20], nodes[5]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(tmp_path / "unsorted.onnx"))
    before = (tmp_path / "unsorted.onnx").read_bytes()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    r = cli(tmp_path / "unsorted.onnx", "--ratio", "0.5", "-o", tmp_path / "p.onnx")
    assert r.returncode == 0, r.stderr
    assert "max abs error 0.00e+00" in r.stdout and (tmp_path / "unsorted.onnx").read_bytes() == before
    onnx.checker.check_model(onnx.load(str(tmp_path / "p.onnx")), full_check=True)
    del model.graph.node[0]                      # now a tensor is read that nothing makes: still refused
    onnx.save(model, str(tmp_path / "broken.onnx"))
    r = cli(tmp_path / "broken.onnx", "--ratio", "0.5")
    assert r.returncode == 2 and "topologically sorted" in r.stderr and len(r.stderr.strip().splitlines()) == 1
