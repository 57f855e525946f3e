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


def test_a_model_without_attention_is_exit_3_before_anything_runs(tmp_path, monkeypatch):
    """models/no-attention-mlp.onnx runs on a batch of 7 only (a Reshape to 7 rows), so synthetic inputs fail
    it: the prune and inspect look for attention first and say there is none (exit 3), not that the synthetic
    run failed (exit 2); nothing is run."""
    from onnxprune import pipeline
    model = MODELS / "no-attention-mlp.onnx"
    for args in ([model, "--ratio", "0.5", "-o", tmp_path / "p.onnx"], ["inspect", model]):
        r = cli(*args)
        assert r.returncode == 3, r.stderr
        assert "no Softmax or attention op: the graph has no attention" in r.stdout + r.stderr
    assert not (tmp_path / "p.onnx").exists()

    def never(*a, **k):
        raise AssertionError("the probe ran")
    monkeypatch.setattr(pipeline, "probe", never)
    assert main([str(model), "--ratio", "0.5", "--dry-run"]) == 3


def test_a_miss_without_a_name_says_its_type():
    from onnxprune.block import Miss
    assert Miss("", "Softmax", "why").describe() == "unnamed node of type Softmax: why"
    assert Miss("s1", "Softmax", "why").describe() == "s1: why"
    assert Miss("", "", "no attention").describe() == "no attention"
    report = {"blocks": [], "params_before": 1, "params_after": 1,
              "misses": [{"node": "", "op": "Softmax", "reason": "why"}]}
    from onnxprune.report import format_table
    assert "  unnamed node of type Softmax: why" in format_table(report).splitlines()


def test_synthetic_ids_stay_within_the_table_they_index_and_inspect_takes_data(tmp_path):
    """models/bert-lang-table.onnx: ``lang_ids`` index a table of 4 rows. Synthetic ids stay below 4 (they were
    drawn up to 15: "indices element out of data bounds"), so it prunes with synthetic inputs; and inspect
    runs on --calib data where given."""
    from onnxprune.inputs import synth_inputs, table_rows
    model = onnx.load(str(MODELS / "bert-lang-table.onnx"))
    assert table_rows(model)["lang_ids"] == 4
    for seed in range(5):
        feeds = synth_inputs(model, seed=seed, batch=4, seq=16)
        assert feeds["lang_ids"].max() < 4 and feeds["input_ids"].max() >= 4
    r = cli(MODELS / "bert-lang-table.onnx", "--ratio", "0.5", "--dry-run")
    assert r.returncode == 0 and "max abs error" in r.stdout, r.stderr
    data = synth_inputs(model, seed=1, batch=3, seq=9)
    np.savez(tmp_path / "d.npz", **data)
    bad = dict(data, lang_ids=np.full_like(data["lang_ids"], 9))
    np.savez(tmp_path / "bad.npz", **bad)
    assert cli("inspect", MODELS / "bert-lang-table.onnx", "--calib", tmp_path / "d.npz").returncode == 0
    r = cli("inspect", MODELS / "bert-lang-table.onnx", "--calib", tmp_path / "bad.npz")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1       # it ran on the data given


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
    """--help: usage, one line of what it does, the options at once (within the first 20 lines), then the
    examples and the explanations."""
    r = cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "inspect" in r.stdout
    lines = r.stdout.splitlines()
    first_option = next(i for i, line in enumerate(lines) if line.startswith("options:"))
    assert first_option < 20 and lines.index("examples:") > first_option


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


# ------------------------------------------------------------------ the conventions a user expects
def test_version_module_form_and_a_bare_command():
    """--version names the tool and what it runs on; ``python -m onnxprune`` is the same command; a bare
    ``onnxprune`` prints its usage and where to read more (exit 2), not an argparse complaint."""
    import subprocess
    import sys
    from onnxprune import __version__
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"onnxprune {__version__} (onnx ") and "onnxruntime" in r.stdout
    m = subprocess.run([sys.executable, "-m", "onnxprune", "--version"], capture_output=True, text=True)
    assert m.returncode == 0 and m.stdout == r.stdout
    bare = cli()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: onnxprune MODEL") and "--help" in bare.stderr


def test_help_and_prune_are_commands(work):
    """``onnxprune help [COMMAND]`` is --help; ``onnxprune prune MODEL`` is ``onnxprune MODEL``; an unknown
    command after help is named with the ones there are."""
    assert "examples:" in cli("help").stdout
    assert cli("help", "bench").stdout.startswith("usage: onnxprune bench")
    bad = cli("help", "nope")
    assert bad.returncode == 2 and "no command 'nope'" in bad.stderr and "bench" in bad.stderr
    r = cli("prune", work / "bert.onnx", "--ratio", "0.5", "-o", work / "p.onnx")
    assert r.returncode == 0, r.stderr
    assert (work / "p.onnx").exists()


def test_quiet_prints_only_what_was_written_and_report_dash_is_stdout(work):
    """-q: no table, only the line that says what was written; --report -: the JSON report on stdout (parsable
    as it is), the summary on stderr, and no file named ``-``."""
    q = cli(work / "bert.onnx", "--ratio", "0.5", "-q", "-o", work / "q.onnx")
    assert q.returncode == 0 and q.stdout.strip() == f"wrote {work / 'q.onnx'}" and not q.stderr
    r = cli(work / "bert.onnx", "--ratio", "0.5", "--report", "-", "-o", work / "r.onnx", cwd=work)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ratio"] == 0.5 and "max abs error" in r.stderr
    assert not (work / "-").exists()


def test_without_sighup_or_resource_every_command_runs(monkeypatch, work):
    """Windows has no SIGHUP and no ``resource`` module: the command line and bench run without them."""
    import builtins
    import signal
    import sys
    monkeypatch.delattr(signal, "SIGHUP")
    real_import = builtins.__import__

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("No module named 'resource'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_resource)
    monkeypatch.delitem(sys.modules, "resource", raising=False)
    monkeypatch.delitem(sys.modules, "onnxprune.bench", raising=False)
    assert main([str(work / "bert.onnx"), "--ratio", "0.5", "-o", str(work / "p.onnx"), "-q"]) == 0
    assert main(["bench", str(work / "bert.onnx"), str(work / "p.onnx"), "--runs", "2", "--warmup", "0",
                 "--seq", "8", "-q"]) == 0


def test_the_progress_bar_says_the_time_left_and_ends_at_100_percent(monkeypatch):
    """On a terminal: the time left at the rate so far, never 100% before the work is done (an estimated
    total may be passed), 100% and the time taken when it is; off with -q (``Progress.enabled``)."""
    import io
    from onnxprune.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter(range(0, 1000, 10))       # ten seconds a step
    monkeypatch.setattr("sys.stderr", Terminal())
    bar = Progress(10, "fitting", min_total=1, unit="fits")
    bar.clock = lambda: next(clock)
    bar.start = bar.clock()
    for _ in range(12):                    # more steps than the estimate
        bar.update()
    drawn = bar.stream.getvalue()
    assert " 99% 10/10 fits" in drawn and "100%" not in drawn
    assert "1m30s left" in drawn           # after one step of ten seconds, nine to go
    bar.done()
    import re
    assert re.search(r"100% 10/10 fits in 1m\d\ds\x1b\[K\n$", bar.stream.getvalue())
    monkeypatch.setattr(Progress, "enabled", False)
    assert not Progress(10, "x", min_total=1).on


def test_the_scores_that_score_writes_are_taken_back_as_importance(work):
    """``onnxprune score --json`` writes its scores; ``--importance`` that file prunes by them, exactly as by
    the scored model's stored initializers."""
    s = cli("score", work / "bert.onnx", "--importance", "weights", "-o", work / "s.onnx", "--json", work / "s.json")
    assert s.returncode == 0, s.stderr
    a = cli(work / "bert.onnx", "--ratio", "0.5", "--importance", work / "s.json", "-o", work / "a.onnx",
            "--report", work / "a.json")
    b = cli(work / "s.onnx", "--ratio", "0.5", "-o", work / "b.onnx", "--report", work / "b.json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    kept = [[blk["kept_heads"] for blk in json.loads((work / f).read_text())["blocks"]] for f in ("a.json", "b.json")]
    assert kept[0] == kept[1]
    scores = json.loads((work / "s.json").read_text())["blocks"]
    for blk, heads in zip(scores.values(), kept[0]):       # the top two of each block, ascending
        assert heads == sorted(sorted(range(4), key=lambda h: (-blk[h], h))[:2])


def test_the_summary_gives_the_file_size_before_and_after(work):
    r = cli(work / "bert.onnx", "--ratio", "0.5", "-o", work / "p.onnx", "--report", work / "r.json")
    assert r.returncode == 0, r.stderr
    was, now = json.loads((work / "r.json").read_text())["file_bytes"]
    assert was == (work / "bert.onnx").stat().st_size and now == (work / "p.onnx").stat().st_size and now < was
    assert f"file size: {was / 2 ** 10:.2f} KB -> {now / 2 ** 10:.2f} KB" in r.stdout


def test_a_ratio_that_whole_kv_groups_round_is_explained(tmp_path):
    """--gqa group on 2 KV groups: --ratio 0.25 keeps floor(2 x 0.75) = 1 group, half the heads; the summary
    says so and why. At 0.5 the ratio is what it removes, and nothing is said."""
    r = cli(MODELS / "llama-d18.onnx", "--ratio", "0.25", "--gqa", "group", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "--ratio 0.25 removed 50% of the query heads: --gqa group keeps floor(2 KV groups x (1 - 0.25)) = 1 " \
           "whole group(s) of 4 heads" in r.stdout
    exact = cli(MODELS / "llama-d18.onnx", "--ratio", "0.5", "--gqa", "group", "--dry-run")
    assert exact.returncode == 0 and "removed 50% of the query heads" not in exact.stdout


def test_inspect_lists_the_graph_inputs_that_calibration_data_must_hold():
    """Every graph input with its type and dims (symbolic ones by name), in text and JSON: a GenAI folder's
    KV-cache inputs too, which --calib data must give (empty) as well."""
    r = cli("inspect", MODELS / "llama-genai" / "model.onnx")
    assert r.returncode == 0 and "6 graph inputs" in r.stdout
    assert "  past_key_values.0.key: float32 [batch_size, 2, past_sequence_length, kv_cache_dim]" in r.stdout
    data = json.loads(cli("inspect", MODELS / "llama-genai" / "model.onnx", "--json").stdout)
    assert data["inputs"][0] == {"name": "input_ids", "dtype": "int64", "dims": ["batch_size", "sequence_length"]}
    assert len(data["inputs"]) == 6 and len(data["blocks"]) == 2


def test_the_project_ships_its_licence_and_type_marker():
    """pyproject says Apache-2.0 and the package is typed: the files that say so are there (and packaged)."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    assert "Apache License" in (root / "LICENSE").read_text() and "Version 2.0" in (root / "LICENSE").read_text()
    assert (root / "onnxprune" / "py.typed").exists()
    text = (root / "pyproject.toml").read_text()
    assert 'license-files = ["LICENSE"]' in text and '"py.typed"' in text
    assert (root / "CHANGELOG.md").exists() and (root / "CONTRIBUTING.md").exists()


def test_a_model_folder_given_as_model_prunes_into_a_pruned_folder(tmp_path):
    """A GenAI folder as MODEL: its decoder (genai_config.json names it) is pruned into DIR-pruned/ beside it,
    with the configs updated and the tokenizer copied; inspect takes the folder too; a folder of several
    models and no config is refused, naming them."""
    src = tmp_path / "genai"
    shutil.copytree(MODELS / "llama-genai", src)
    r = cli(src, "--ratio", "0.5")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "genai-pruned"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    cfg = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    was = json.loads((src / "genai_config.json").read_text())["model"]["decoder"]
    assert cfg["num_key_value_heads"] == was["num_key_value_heads"] // 2
    assert cli("inspect", src).returncode == 0
    two = tmp_path / "two"
    two.mkdir()
    for n in ("bert-ts.onnx", "gpt2-ts.onnx"):
        shutil.copy(MODELS / n, two / n)
    bad = cli(two, "--ratio", "0.5")
    assert bad.returncode == 2 and "a folder of 2 models (bert-ts.onnx, gpt2-ts.onnx)" in bad.stderr
    assert sorted(p.name for p in two.iterdir()) == ["bert-ts.onnx", "gpt2-ts.onnx"]
