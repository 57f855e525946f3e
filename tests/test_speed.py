"""--target-speedup: a latency model measured on the provider (speed.py), the budget's steps priced by it
(budget.LatencyModel), and the written model timed against the original."""

import json

import numpy as np
import onnx
import pytest

from onnxprune import prune_model
from onnxprune.api import inspect_model
from onnxprune.budget import FEATURES, LatencyModel
from onnxprune.cli import main
from onnxprune.errors import PlanError
from onnxprune.inputs import synth_inputs
from onnxprune.options import PruneOptions, SpeedTarget
from onnxprune.speed import nonnegative_fit, variants

from conftest import MODELS


def _bert():
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    return model, synth_inputs(model, seed=1, batch=16, seq=32)


def test_the_features_of_a_cut_by_hand():
    """BERT block: 4 heads of 8, width 32; batch 2, length 16. Ranks shrink projections, products and cache, not
    the softmax; heads shrink all four; a decode step attends to context + 1 tokens with one new token."""
    block = inspect_model(onnx.load(str(MODELS / "bert-ts.onnx"))).blocks[0]
    lat = LatencyModel("cpu", "forward", 2, 16, 16, 1.0, (0.0,) * 4)
    whole = lat.features(block, 32, 4, 4, {})
    assert list(whole) == [2 * 16 * 32 * 8 * 16, 2 * 16 * 16 * 4 * 16, 2 * 16 * 16 * 4, 2 * 16 * 4 * 16]
    ranks = lat.features(block, 32, 4, 4, {"qk": 4, "ov": 8})
    assert ranks[0] == 2 * 16 * 32 * (4 * 8 + 8 * 8) and ranks[2] == whole[2] and ranks[3] == 2 * 16 * 4 * 12
    assert list(lat.features(block, 32, 2, 2, {})) == list(whole / 2)
    decode = LatencyModel("cpu", "decode", 3, 1, 101, 1.0, (0.0,) * 4).features(block, 32, 4, 4, {})
    assert list(decode) == [3 * 32 * 8 * 16, 3 * 101 * 4 * 16, 3 * 101 * 4, 3 * 101 * 4 * 16]


def test_the_cost_fit_recovers_costs_and_never_goes_negative():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1e6, (5, 4))
    truth = np.array([2e-6, 0.0, 5e-5, 1e-7])
    assert np.allclose(nonnegative_fit(x, x @ truth), truth, atol=1e-9)
    # a feature that makes things slower when removed (noise): dropped, the rest refitted
    y = x @ truth
    y_bad = y - x[:, 1] * 1e-5
    coef = nonnegative_fit(x, y_bad)
    assert coef[1] == 0 and np.all(coef >= 0)
    assert nonnegative_fit(np.zeros((3, 4)), np.ones(3)).tolist() == [0.0] * 4


def test_variants_cut_every_block_alike():
    blocks = inspect_model(onnx.load(str(MODELS / "llama-gqa4-d18.onnx"))).blocks
    v = variants(blocks)
    assert set(v) == {"heads/2", "heads/4", "groups/2", "qk/2", "ov/2"}
    b = blocks[0]
    assert len(v["heads/2"][b.index][0]) == b.num_heads // 2
    assert len(b.kept_kv_heads(v["heads/2"][b.index][0])) == b.num_kv_heads        # every group keeps some
    assert len(b.kept_kv_heads(v["groups/2"][b.index][0])) == b.num_kv_heads // 2  # whole groups go
    assert v["qk/2"][b.index] == (tuple(range(b.num_heads)), {"qk": b.head_dim // 2})


def _plan_with(costs, target=1.25):
    """bert-ts planned against a latency model with the given costs per unit (ms), no timing."""
    model, calib = _bert()
    blocks = inspect_model(model).blocks
    lat = LatencyModel("cpu", "forward", 4, 64, 64, 0.0, tuple(costs))
    whole = sum(lat.features(b, 32, b.num_heads, b.num_kv_heads, {}) for b in blocks)
    attention = float(np.dot(costs, whole))
    lat = LatencyModel("cpu", "forward", 4, 64, 64, attention * 2, tuple(costs))    # attention: half the time
    opts = PruneOptions(target=SpeedTarget(target, "cpu", 4, 64), latency=lat, calib=calib, verify=True)
    return prune_model(model, options=opts)


def test_the_planner_spends_by_predicted_time():
    """Where the softmax costs the time, only fewer heads save it: every block drops heads and keeps its ranks.
    Where the projections cost it, ranks save as much as heads: the plan is priced on loss per ms, and reaches
    the target."""
    softmax = _plan_with([0.0, 0.0, 1e-3, 0.0])
    assert softmax.budget.predicted >= 1.25
    assert all(len(softmax.kept[b.index]) < b.num_heads for b in softmax.blocks)
    assert not softmax.dim_fits
    projections = _plan_with([1e-6, 0.0, 0.0, 0.0])
    assert projections.budget.predicted >= 1.25 and projections.max_error <= 1e-4


def test_a_target_beyond_what_attention_takes_is_refused_with_the_most_it_can_give():
    with pytest.raises(PlanError, match=r"a 3x speed-up would need .* at most 2.00x, with no attention left"):
        _plan_with([0.0, 0.0, 1e-3, 0.0], target=3)


@pytest.mark.parametrize("kw, message", [
    (dict(ratio=0.5), "chooses the heads and ranks itself"),
    (dict(attention_ratio=0.5), "not both"),
    (dict(calib=None), "give --calib"),
])
def test_the_target_is_refused_with_what_it_conflicts_with(kw, message):
    _, calib = _bert()
    with pytest.raises(PlanError, match=message):
        PruneOptions(**{"target": SpeedTarget(1.3), "calib": calib, **kw})
    with pytest.raises(PlanError, match="must be a number above 1"):
        PruneOptions(target=SpeedTarget(0.9), calib=calib)


def test_the_command_measures_plans_and_confirms(tmp_path, capsys):
    """End to end on bert-ts (CPU, batch 4, length 64): the variants timed, the costs fitted (none negative),
    a plan predicted to reach the target, the written model timed against the original; both in the report."""
    _, calib = _bert()
    np.savez(tmp_path / "c.npz", **calib)
    report = tmp_path / "r.json"
    assert main([str(MODELS / "bert-ts.onnx"), "--target-speedup", "1.15", "--calib", str(tmp_path / "c.npz"),
                 "--batch", "4", "--seq", "64", "-o", str(tmp_path / "p.onnx"), "--report", str(report)]) == 0
    speed = json.loads(report.read_text())["speed_target"]
    assert (speed["target"], speed["provider"], speed["batch"], speed["seq"]) == (1.15, "cpu", 4, 64)
    assert speed["predicted"] >= 1.15 and speed["measured"] > 1.0 and speed["base_ms"] > 0
    assert set(speed["costs"]) == set(FEATURES) and min(speed["costs"].values()) >= 0
    assert {v["name"] for v in speed["variants"]} == {"heads/2", "heads/4", "qk/2", "ov/2"}
    text = capsys.readouterr().out
    assert "speed target: predicted" in text and "measured" in text


def test_a_dry_run_says_the_target_was_not_timed(tmp_path, capsys):
    _, calib = _bert()
    np.savez(tmp_path / "c.npz", **calib)
    assert main([str(MODELS / "bert-ts.onnx"), "--target-speedup", "1.1", "--calib", str(tmp_path / "c.npz"),
                 "--batch", "4", "--seq", "64", "--dry-run"]) == 0
    assert "not measured (not timed: nothing written (--dry-run))" in capsys.readouterr().out
    assert main([str(MODELS / "bert-ts.onnx"), "--target-decode", "--ratio", "0.5"]) == 2


def test_a_model_with_external_data_is_measured_and_left_as_it_was(tmp_path):
    """The variants are written beside the original into a temporary folder: the model's tensors must keep
    pointing at its own data file (writing a model points them at the new one), or the next variant fails."""
    from onnxprune.api import measure_latency
    folder = MODELS / "llama-genai"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    before = model.SerializeToString()
    calib = synth_inputs(model, seed=1, batch=4, seq=16)
    opts = PruneOptions(target=SpeedTarget(1.1, "cpu", 2, 1, 40), calib=calib, external_dir=folder)
    lat = measure_latency(model, opts, progress=False)
    assert {n for n, _, _ in lat.points} == {"heads/2", "heads/4", "groups/2", "qk/2"}
    assert lat.phase == "decode" and lat.total == 41 and lat.seq == 1
    assert model.SerializeToString() == before


def test_a_rank_per_layer_gets_a_cache_of_its_own_size_in_synthetic_inputs():
    """A speed target written as a model file (not a folder) may cut one layer of a GenAI model and not the
    other, so its cache inputs share one symbolic head size with two values: synthetic inputs (bench, MACs)
    must give each input its own, or onnxruntime refuses the model."""
    from onnxprune.verify import run
    folder = MODELS / "llama-genai-d32"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    blocks = inspect_model(model, folder).blocks
    lat = LatencyModel("cpu", "decode", 1, 1, 9, 0.0, (1e-3, 0.0, 0.0, 0.0))
    attention = sum(lat.block_ms(b, 128, b.num_heads, b.num_kv_heads, {}) for b in blocks)
    lat = LatencyModel("cpu", "decode", 1, 1, 9, attention * 4, lat.coef)
    opts = PruneOptions(target=SpeedTarget(1.05, "cpu", 1, 1, 8), latency=lat, external_dir=folder,
                        calib=synth_inputs(model, seed=2, batch=4, seq=8), compensate="none")
    result = prune_model(model, options=opts)
    ranks = {f.block: f.rank for f in result.dim_fits}
    assert len(ranks) == 1, ranks                   # one step: one layer cut, the other whole
    feeds = synth_inputs(result.model, batch=1, seq=2)
    widths = sorted({v.shape[-1] for k, v in feeds.items() if "past" in k})
    assert widths == sorted({next(iter(ranks.values())), 32})
    run(result.model, feeds, folder)
