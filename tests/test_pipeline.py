"""The pipeline's contracts: options checked once, stages that name their failures, the library that raises
when pruned != masked, nodes named once on the model, readable block names, and the importance registry."""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import PruneOptions, prune_model
from onnxprune import pipeline
from onnxprune.api import count_result_macs, inspect_model
from onnxprune.cli import main
from onnxprune.errors import PlanError, VerifyError
from onnxprune.importance import NAMED, SOURCES, help_lines
from onnxprune.inputs import synth_inputs

from conftest import MODELS, gated as _gated, plant_in_rewrite

BERT = MODELS / "bert-ts.onnx"


def _unnamed(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.name = ""
    return out


def test_unnamed_nodes_are_named_once_so_gates_fold_and_macs_count():
    """An export whose nodes have no names: the gates are still found and folded, the MACs still counted
    per block, and the caller's model is not changed."""
    model = _unnamed(_gated(onnx.load(str(BERT))))
    before = model.SerializeToString()
    result = prune_model(model, 0.5)
    assert result.gates == 2 and result.importance_source == "gates"
    assert result.kept == {0: (0, 2), 1: (1, 3)}                     # the two largest gates of each block
    assert model.SerializeToString() == before
    before, after = count_result_macs(model, result, 1, 16).macs
    width, seq = 32, 16                   # by hand: Q/K/V/O projections, then the score and context products
    assert before.blocks == {b: 4 * seq * width * width + 2 * seq * seq * width for b in (0, 1)}
    assert after.blocks == {b: 4 * seq * width * width // 2 + 2 * seq * seq * width // 2 for b in (0, 1)}


def test_the_library_raises_when_pruned_differs_from_masked(monkeypatch):
    """A rewrite bug planted (one pruned projection shifted): prune_model raises, with no model returned;
    verify=False is the explicit way out, and then the error is not measured."""
    plant_in_rewrite(monkeypatch, lambda w: w + 0.5)
    model = onnx.load(str(BERT))
    with pytest.raises(VerifyError, match="differs from the masked original"):
        prune_model(model, 0.5)
    with pytest.raises(VerifyError):
        prune_model(model, 0.5, atol=1e-3)
    assert prune_model(model, 0.5, verify=False).max_error is None
    assert prune_model(model, 0.5, atol=10.0).max_error > 1e-3        # a tolerance that says so


def test_a_stray_exception_becomes_the_stages_error(monkeypatch):
    def broken(state, options):
        raise ZeroDivisionError("division by zero")

    stages = tuple(replace(s, run=broken) if s.name == "plan" else s for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    with pytest.raises(PlanError, match="plan failed: ZeroDivisionError"):
        prune_model(onnx.load(str(BERT)), 0.5)


def test_options_are_checked_once_and_frozen():
    options = PruneOptions(ratio="0.5", scope="global")
    with pytest.raises(AttributeError):
        options.ratio = 0.25
    for bad in (dict(), dict(ratio=0.5, threshold=1.0), dict(ratio=1.5), dict(threshold=float("nan")),
                dict(ratio=0.5, scope="everywhere"), dict(ratio=0.5, gqa="some"), dict(ratio=0.5, compensate="x"),
                dict(kept={0: [1]}, multiple_of=8), dict(ratio=0.5, multiple_of=0), dict(ratio=0.5, min_heads=-1),
                dict(ratio=0.5, importance="psychic"), dict(ratio=0.5, atol=-1.0)):
        with pytest.raises(PlanError):
            PruneOptions(**bad)
    assert options.tolerance(fp16=False) == 1e-4 and options.tolerance(fp16=True) == 1e-2
    by_options = prune_model(BERT, options=options)
    by_keywords = prune_model(BERT, "0.5", scope="global")
    assert by_options.kept == by_keywords.kept and by_options.options == options


def test_dynamo_blocks_are_named_after_their_module(tmp_path):
    assert [b.name for b in inspect_model(MODELS / "llama-d18.onnx").blocks] == \
        ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [b.name for b in inspect_model(MODELS / "bert-d23-sdpa.onnx").blocks] == \
        ["model.encoder.layer.0.attention.self", "model.encoder.layer.1.attention.self"]
    report = tmp_path / "r.json"
    assert main([str(MODELS / "whisper-d18.onnx"), "--ratio", "0.5", "--dry-run", "--report", str(report)]) == 0
    names = [b["name"] for b in json.loads(report.read_text())["blocks"]]
    assert names[:3] == ["model.encoder.layers.0.self_attn", "model.encoder.layers.1.self_attn",
                         "model.decoder.layers.0.self_attn"] and len(set(names)) == len(names)


def test_every_importance_source_is_registered_with_its_help():
    assert set(SOURCES) >= {"weights", "initializers", "gates", "file", "activation", "ablation",
                            "mean-ablation", "residual"}
    text = help_lines()
    for name, source in SOURCES.items():
        assert source.help and (name in text or name == "file")
    assert "FILE.json|npy" in text and "file" not in NAMED


def test_a_new_importance_module_needs_nothing_else(tmp_path, monkeypatch, capsys):
    """The registry is the only list: a source added to it is accepted by the API and the command line,
    listed in --help, and used."""
    from onnxprune import importance
    from onnxprune.importance import Source
    source = Source("reverse", "scores the last head highest", lambda ctx: {
        b.index: np.arange(b.num_heads, dtype=float) for b in ctx.blocks}, order=99)
    monkeypatch.setitem(importance.SOURCES, "reverse", source)
    monkeypatch.setattr(importance, "NAMED", importance.NAMED + ("reverse",))
    assert prune_model(BERT, 0.5, importance="reverse").kept == {0: (2, 3), 1: (2, 3)}
    assert main(["--help"]) == 0
    assert "reverse        scores the last head highest" in capsys.readouterr().out


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_stored_scores_with_a_nan_are_one_line_in_every_scope(tmp_path, capsys, scope):
    model = onnx.load(str(BERT))
    table = np.array([[1.0, np.nan, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    model.graph.initializer.append(numpy_helper.from_array(table, "onnxprune.head_importance"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert main([str(tmp_path / "m.onnx"), "--ratio", "0.5", "--scope", scope, "--dry-run"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("onnxprune: error:") and "finite" in err


def test_calibration_on_weights_shared_through_identity():
    """TorchScript shares equal weights through Identity (a cloned encoder): each block is calibrated and
    compensated on its own copy, and the pruned model equals the masked, compensated original."""
    model = onnx.load(str(MODELS / "torch-encoder-cloned-ts.onnx"))
    calib = synth_inputs(model, seed=5, batch=8, seq=8)
    for compensate in (None, "refit"):
        result = prune_model(model, 0.5, importance="ablation", calib=calib, compensate=compensate)
        assert result.max_error <= 1e-4 and all(len(k) == 2 for k in result.kept.values())


def test_every_family_module_is_found_with_its_three_hooks():
    from onnxprune.match import FAMILIES
    assert {f.FAMILY for f in FAMILIES} == {"torch-export", "onnx-attention", "ort-fused"}
    for family in FAMILIES:
        assert all(callable(getattr(family, hook, None)) for hook in ("cores", "start", "head_attrs"))


@pytest.mark.parametrize("name, mask_dim", [("gpt2-ort-past.onnx", "total_seq_len"),
                                             ("llama-genai/model.onnx", "total_sequence_length")])
def test_a_mask_length_written_as_a_sum_is_read(name, mask_dim):
    """Optimum's decoders name the mask's length "past_sequence_length + sequence_length"; the probe used to
    give it the past length alone (0), and ONNX Runtime failed on the Gather of the mask. The same decoders
    with their mask so renamed prune exactly, prompt and decode step (past 3) both."""
    from onnxprune.inputs import synth_inputs
    model = onnx.load(str(MODELS / name))
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
    dim = next(d for d in mask.type.tensor_type.shape.dim if d.dim_param == mask_dim)
    dim.dim_param = "past_sequence_length + sequence_length"
    assert synth_inputs(model, seq=5, past=3)["attention_mask"].shape[1] == 8
    result = prune_model(model, 0.5, external_dir=MODELS / name.split("/")[0] if "/" in name else None)
    assert result.max_error <= 1e-4 and result.io_keep



def test_plans_in_a_grid_of_heads_are_rectangles():
    """CodeGen holds its 8 heads as 4 shards x 2: a plan must keep the same heads of every kept shard. The
    best-scoring rectangle of the planned size is taken; a size no rectangle has rounds up."""
    from onnxprune.plan import fit_grid
    rows = [[0, 1], [2, 3], [4, 5], [6, 7]]
    scores = np.array([9, 1, 8, 2, 7, 3, 1, 9], float)
    assert fit_grid((0, 1, 2, 3), rows, scores) == (0, 1, 2, 3)          # already a rectangle: kept
    assert fit_grid((0, 2, 4, 7), rows, scores) == (0, 2, 4, 6)          # one column of all four shards
    assert fit_grid((0, 7), rows, scores) == (0, 2)                       # best pair in one column
    assert fit_grid((0, 2, 4, 5, 7), rows, scores) == (0, 1, 2, 3, 4, 5)  # 5 has no rectangle: 3 x 2
    model = onnx.load(str(MODELS / "codegen-ts.onnx"))
    for ratio in (0.25, 0.5, 0.75):
        result = prune_model(model, ratio)
        assert result.max_error <= 1e-4
        for b in result.blocks:
            kept = set(result.kept[b.index])
            cols = {tuple(i for i, h in enumerate(r) if h in kept) for r in rows if kept & set(r)}
            assert len(cols) == 1
