"""Importance sources, global and threshold allocation, calibration and compensation (no torch needed)."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import prune_model
from onnxprune.api import inspect_model, score_model
from onnxprune.importance import calibrated_scores
from onnxprune.transforms.compensate import compensation
from onnxprune.calibration.session import Calibrator
from onnxprune.calibration.data import batches, load_calib
from onnxprune.cli import main
from onnxprune.errors import InputError, PlanError
from onnxprune.plan import plan_model
from onnxprune.inputs import synth_inputs
from onnxprune.importance.initializers import initializer_importance
from onnxprune.verify import max_abs_diff, run

from conftest import GATES, MODELS, gated as _gated  # noqa: E402
MHA4 = [(0,), (1,), (2,), (3,)]


def _bert():
    return onnx.load(str(MODELS / "bert-ts.onnx"))


def _calib(model, n=24, seq=9, seed=3):
    return synth_inputs(model, seed=seed, batch=n, seq=seq)


# ------------------------------------------------------------------ allocation
def test_global_scope_ranks_normalised_scores_across_blocks():
    # block 1's scores are 10x larger but one head dominates it; normalised per block, block 0 wins 3 slots
    imp = {0: np.array([1.0, 2, 3, 4]), 1: np.array([100.0, 10, 10, 10])}
    plans = plan_model(imp, {0: MHA4, 1: MHA4}, ratio=0.5)
    assert plans[0].kept_heads == (1, 2, 3) and plans[1].kept_heads == (0,)


def test_global_scope_keeps_min_heads_in_every_block():
    imp = {0: np.array([1.0, 1, 1, 1]), 1: np.array([9.0, 8, 7, 6])}
    plans = plan_model(imp, {0: MHA4, 1: MHA4}, ratio=0.75, min_heads=1)
    assert sum(len(p.kept_heads) for p in plans.values()) == 2
    assert all(len(p.kept_heads) >= 1 for p in plans.values())
    plans = plan_model(imp, {0: MHA4, 1: MHA4}, ratio=0.75, min_heads=2)
    assert [len(plans[b].kept_heads) for b in (0, 1)] == [2, 2]
    assert plans[0].kept_heads == (0, 1)                  # ties go to the lower index


def test_threshold_keeps_heads_at_or_above_it():
    imp = {0: np.array([0.0, 0.5, 0.9, 0.2]), 1: np.array([0.1, 0.0, 0.05, 0.3])}
    plans = plan_model(imp, {0: MHA4, 1: MHA4}, threshold=0.5)
    assert plans[0].kept_heads == (1, 2) and not plans[0].min_heads_applied
    assert plans[1].kept_heads == (3,) and plans[1].min_heads_applied    # nothing reaches 0.5: best one kept


def test_global_and_threshold_through_prune_model():
    model = _bert()
    imp = {0: np.array([1.0, 2, 3, 4]), 1: np.array([100.0, 10, 10, 10])}
    r = prune_model(model, 0.5, importance=imp, scope="global")
    assert r.kept == {0: (1, 2, 3), 1: (0,)} and r.max_error <= 1e-4
    r = prune_model(model, threshold=3, importance=imp)
    assert r.kept == {0: (2, 3), 1: (0, 1, 2, 3)}


def test_global_scope_needs_group_mode_for_gqa():
    with pytest.raises(PlanError, match="--gqa group"):
        plan_model({0: np.arange(8.0)}, {0: [(0, 1, 2, 3), (4, 5, 6, 7)]}, ratio=0.5, gqa="uniform")
    plans = plan_model({0: np.arange(8.0)}, {0: [(0, 1, 2, 3), (4, 5, 6, 7)]}, ratio=0.5, gqa="group")
    assert plans[0].kept_heads == (4, 5, 6, 7)


# ------------------------------------------------------------------ calibration
def _zero_head(model, block, head):
    """``model`` with the output-projection rows of one head zeroed: a head that contributes nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(i for i in out.graph.initializer if i.name == block.o_proj.weight)
    arr = numpy_helper.to_array(init).copy()
    t = block.tensor(block.o_proj.weight)
    idx = [slice(None)] * arr.ndim
    idx[t.axes[0]] = np.flatnonzero(np.isin(t.owner, [u for u, hs in enumerate(block.units) if hs == {head}]))
    arr[tuple(idx)] = 0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return out


@pytest.mark.parametrize("method", ["ablation", "mean-ablation"])
def test_ablation_scores_a_silent_head_zero(method):
    model = _bert()
    block = inspect_model(model).blocks[1]
    silent = _zero_head(model, block, 2)
    cal = Calibrator(silent, inspect_model(silent).blocks, batches(_calib(silent), 8), progress=False)
    scores = calibrated_scores(cal, method)
    assert scores[1][2] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.delete(scores[1], 2) > 1e-6) and np.all(scores[0] > 1e-6)


def test_activation_scores_match_a_direct_computation():
    model = _bert()
    blocks = inspect_model(model).blocks
    data = _calib(model)
    scores = calibrated_scores(Calibrator(model, blocks, batches(data, 8), progress=False), "activation")
    # the context read by block 0's output projection, captured directly, split into its 4 heads of 8
    cal = Calibrator(model, blocks, [data], progress=False)
    ctx = cal.run(data, contexts=True)[cal.sites[0].context]
    rows = ctx.reshape(-1, ctx.shape[-1])[data["attention_mask"].reshape(-1) != 0]
    assert np.allclose(scores[0], (rows.reshape(len(rows), 4, 8) ** 2).sum(axis=(0, 2)), rtol=1e-6)


def _copy_head(model, block, src, dst):
    """``model`` with head ``dst``'s Q, K and V weights and biases replaced by head ``src``'s: two heads
    that compute the same context, so either one can be dropped and the other refitted to replace it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for role in "qkv":
        p = block.projection(role)
        for name in filter(None, (p.weight, p.bias)):
            t = block.tensor(name)
            arr = np.moveaxis(numpy_helper.to_array(inits[name]).copy(), t.axes[0], 0)
            cols = {h: np.flatnonzero(np.isin(t.owner, [u for u, hs in enumerate(block.units) if h in hs]))
                    for h in (src, dst)}
            arr[cols[dst]] = arr[cols[src]]
            inits[name].CopyFrom(numpy_helper.from_array(np.moveaxis(arr, 0, t.axes[0]), name))
    return out


def test_residual_finds_a_head_that_another_can_replace():
    model = _bert()
    twin = _copy_head(model, inspect_model(model).blocks[0], 0, 1)
    cal = Calibrator(twin, inspect_model(twin).blocks, batches(_calib(twin), 8), progress=False)
    res = calibrated_scores(cal, "residual")[0]
    first, second = np.sort(res)[:2]
    assert np.argmin(res) in (0, 1) and first < 0.1 * second    # one twin goes first, nearly free
    assert res.max() == 1.0 and len(set(res)) == 4              # a strict order ending at the whole output
    act = calibrated_scores(cal, "activation")[0]
    assert act[0] == pytest.approx(act[1])                       # the activation norm cannot tell


def test_calibrated_importance_from_prune_model():
    model = _bert()
    r = prune_model(model, 0.5, importance="ablation", calib=_calib(model))
    assert r.importance_source == "ablation" and r.max_error <= 1e-4
    assert all(len(k) == 2 for k in r.kept.values())


# ------------------------------------------------------------------ compensation
@pytest.mark.parametrize("mode", ["bias", "scale", "refit", "auto"])
def test_compensation_reduces_the_error_on_its_calibration_data(mode):
    model = _bert()
    data = _calib(model, n=48)
    kept = {0: (0, 3), 1: (1, 2)}
    reference = run(model, data)
    plain = prune_model(model, kept=kept)
    comp = prune_model(model, kept=kept, compensate=mode, calib=data)
    assert comp.max_error <= 1e-4 and comp.compensate == mode       # still exactly the masked (compensated) model
    e_plain = max_abs_diff(reference, run(plain.model, data))
    e_comp = max_abs_diff(reference, run(comp.model, data))
    assert e_comp < e_plain
    if mode == "refit":
        err = {n: np.mean((run(m, data)["last_hidden_state"] - reference["last_hidden_state"]) ** 2)
               for n, m in (("plain", plain.model), ("refit", comp.model))}
        assert err["refit"] < 0.5 * err["plain"]


def test_auto_compensation_is_judged_on_data_it_did_not_fit():
    """auto fits every mode on 3/4 of the calibration batches and keeps, per block, the best on the other
    quarter: never worse there than no compensation, and on other data (another seed) the model is closer
    to the original than the uncompensated one. The report says what each block got."""
    model = _bert()
    kept = {0: (0, 3), 1: (1, 2)}
    r = prune_model(model, kept=kept, compensate="auto", calib=_calib(model, n=64))
    assert [f.block for f in r.fits] == [0, 1]
    assert all(f.error_after <= f.error_before for f in r.fits)
    assert all(f.mode in ("none", "bias", "scale") or f.mode.startswith("refit@") for f in r.fits)
    other = synth_inputs(model, seed=11, batch=32, seq=8)
    reference = run(model, other)["last_hidden_state"]
    plain = prune_model(model, kept=kept)
    mse = {n: np.mean((run(m.model, other)["last_hidden_state"] - reference) ** 2) for n, m in
           (("plain", plain), ("auto", r))}
    assert mse["auto"] < mse["plain"], mse


def test_the_fits_recover_what_they_are_made_for():
    """scale finds the per-head factors of a target built from them; refit with a huge ridge leaves the
    rows as they were (its ridge pulls towards them, not to zero); the held-out choice prefers no change
    when nothing is missing."""
    from onnxprune.transforms.compensate import _choose, _fit_mode
    rng = np.random.default_rng(0)
    heads_of_row = np.repeat([0, 1, 2], 4)
    w = rng.normal(size=(12, 6))
    x = rng.normal(size=(400, 12))
    scales = np.array([0.5, 2.0, 1.5])
    y = (x * scales[heads_of_row]) @ w + 0.3
    rows, shift = _fit_mode("scale", x, y, w, heads_of_row, 0.01)
    assert np.allclose(rows, w * scales[heads_of_row][:, None], atol=1e-2) and np.allclose(shift, 0.3, atol=1e-2)
    rows, _ = _fit_mode("refit@1e9", x, y, w, heads_of_row, 0.01)
    assert np.allclose(rows, w, atol=1e-3)
    rows, _ = _fit_mode("refit@1e-6", x, y, w, heads_of_row, 0.01)
    assert np.allclose(x @ rows, y - 0.3, atol=1e-2)
    held = np.arange(400) >= 300
    assert _choose(x, x @ w, w, heads_of_row, held)[0] == "none"
    assert _choose(x, y, w, heads_of_row, held)[0] != "none"


def test_calibration_batches_shrink_when_the_outputs_are_large(monkeypatch):
    """An LLM's logits make a batch of 16 samples gigabytes: batches are cut so that one batch's outputs stay
    under the budget (here lowered to three samples' worth of BERT's [S, 32] hidden states)."""
    from onnxprune import pipeline
    from onnxprune.calibration import session
    from onnxprune.options import PruneOptions
    model, options = _bert(), PruneOptions(ratio=0.5)
    data = _calib(model, n=32, seq=9)
    state = pipeline.match(pipeline.start(model, options), options)
    assert session.batch_size(state.model, state.shapes, data) == 16
    monkeypatch.setattr(session, "OUTPUT_BUDGET", 3 * 4 * 9 * 32)
    assert session.batch_size(state.model, state.shapes, data) == 3
    monkeypatch.setattr(session, "OUTPUT_BUDGET", 1)
    assert session.batch_size(state.model, state.shapes, data) == 1


def test_compensation_gives_a_bias_free_projection_a_bias():
    model = onnx.load(str(MODELS / "llama-ts.onnx"))       # Llama's o_proj has no bias
    data = synth_inputs(model, seed=3, batch=16, seq=8)
    r = prune_model(model, 0.5, compensate="bias", calib=data)
    assert r.max_error <= 1e-4
    assert sum(i.name.endswith(".onnxprune_bias") for i in r.model.graph.initializer) == len(r.blocks)


# ------------------------------------------------------------------ importance as an artefact
def test_scores_round_trip_through_score_and_prune(tmp_path):
    model = _bert()
    data = _calib(model)
    scored, blocks, scores = score_model(model, "activation", calib=data)
    path = tmp_path / "scored.onnx"
    onnx.save(scored, str(path))
    loaded = onnx.load(str(path))
    stored = initializer_importance(loaded, blocks)
    assert all(np.allclose(stored[b.index], scores[b.index], rtol=1e-6) for b in blocks)
    r = prune_model(loaded, 0.5)                             # no source named: the stored scores
    assert r.importance_source == "initializers (activation)"
    assert r.kept == prune_model(model, 0.5, importance=scores, verify=False).kept
    # the pruned model carries the kept heads' scores, so it can be pruned again the same way
    again = initializer_importance(r.model, prune_model(r.model, 0, verify=False).blocks)
    assert all(np.allclose(again[b], np.asarray(scores[b])[list(r.kept[b])], rtol=1e-6) for b in r.kept)
    onnx.checker.check_model(r.model, full_check=True)


def test_importance_table_and_glob_override():
    model = _bert()
    blocks = inspect_model(model).blocks
    table = np.array([[4.0, 3, 2, 1], [1.0, 2, 3, 4]], dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(table, "gates"))
    assert prune_model(model, 0.5, importance_initializer="gates").kept == {0: (0, 1), 1: (2, 3)}
    for b in blocks:
        model.graph.initializer.append(numpy_helper.from_array(table[1 - b.index], f"L{b.index}.my_gate"))
    assert prune_model(model, 0.5, importance_initializer="*.my_gate").kept == {0: (2, 3), 1: (0, 1)}
    with pytest.raises(InputError, match="no initializer matches"):
        prune_model(model, 0.5, importance_initializer="nothing*")


def test_importance_file_json_and_npy(tmp_path):
    model = _bert()
    blocks = inspect_model(model).blocks
    (tmp_path / "s.json").write_text(json.dumps({"0": [1, 2, 3, 4], blocks[1].name: [4, 3, 2, 1]}))
    assert prune_model(model, 0.5, importance=str(tmp_path / "s.json")).kept == {0: (2, 3), 1: (0, 1)}
    np.save(tmp_path / "s.npy", np.array([[9.0, 0, 0, 9], [0, 9, 9, 0]]))
    r = prune_model(model, 0.5, importance=tmp_path / "s.npy")
    assert r.kept == {0: (0, 3), 1: (1, 2)} and r.importance_source == "file"
    (tmp_path / "bad.json").write_text(json.dumps({"0": [1, 2]}))
    with pytest.raises(InputError, match="expected 4 finite scores"):
        prune_model(model, 0.5, importance=str(tmp_path / "bad.json"))


# ------------------------------------------------------------------ command line
def test_cli_score_then_prune_with_calibration(tmp_path, capsys):
    model = _bert()
    data = _calib(model)
    np.savez(tmp_path / "calib.npz", **data)
    scored, pruned = tmp_path / "scored.onnx", tmp_path / "p.onnx"
    assert main(["score", str(MODELS / "bert-ts.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "-o", str(scored), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["method"] == "ablation"
    assert main([str(scored), "--ratio", "0.5", "--scope", "global", "--compensate",
                 "--calib", str(tmp_path / "calib.npz"), "-o", str(pruned), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["importance"] == "initializers (ablation)" and report["compensate"] == "auto" and report["compensation"]
    assert report["max_error"] <= 1e-4
    assert main([str(MODELS / "bert-ts.onnx"), "--ratio", "0.5", "--compensate", "bias", "--calib",
                 str(tmp_path / "calib.npz"), "--dry-run", "--report", str(tmp_path / "r2.json")]) == 0
    assert json.loads((tmp_path / "r2.json").read_text())["importance"] == "activation"   # best with --compensate
    assert main([str(MODELS / "bert-ts.onnx"), "--threshold", "1e9", "--dry-run"]) == 0
    assert "(min-heads)" in capsys.readouterr().out


def test_cli_bad_calibration_data_is_one_line(tmp_path, capsys):
    np.savez(tmp_path / "c.npz", input_ids=np.ones((2, 3), dtype=np.int64))
    code = main([str(MODELS / "bert-ts.onnx"), "--ratio", "0.5", "--calib", str(tmp_path / "c.npz"),
                 "-o", str(tmp_path / "p.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no array for graph input" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()
    with pytest.raises(InputError):
        load_calib(tmp_path / "missing.npz", _bert())


# ------------------------------------------------------------------ head gates
def test_gates_fold_exactly_and_serve_as_importance():
    from onnxprune.transforms.gates import find_gates, fold_gates
    model = _gated(_bert())
    blocks = inspect_model(model).blocks
    gates = find_gates(model, blocks)
    assert [g.values for g in gates] == [tuple(np.float32(v).item() for v in row) for row in GATES]
    folded = fold_gates(model, blocks, gates)
    assert not any(n.op_type == "Mul" and n.name.startswith("/gate") for n in folded.graph.node)
    feeds = synth_inputs(model, batch=3, seq=6)
    assert max_abs_diff(run(model, feeds), run(folded, feeds)) <= 1e-5
    r = prune_model(model, threshold=0.5)              # no source named: the gates are the importance
    assert r.kept == {0: (0, 2), 1: (1, 3)} and r.importance_source == "gates" and r.gates == 2
    assert r.max_error <= 1e-4
    assert max_abs_diff(run(model, feeds), run(r.model, feeds)) > 1e-3      # the 0.4 and 0.2 heads went
    zero_only = prune_model(model, threshold=1e-9)     # only the heads gated to 0: the function is unchanged
    assert zero_only.kept == {0: (0, 2, 3), 1: (0, 1, 3)}
    assert max_abs_diff(run(model, feeds), run(zero_only.model, feeds)) <= 1e-5


def test_a_gate_before_the_softmax_is_not_folded():
    from onnxprune.transforms.gates import find_gates
    model = _gated(_bert(), before_softmax=True)
    assert find_gates(model, inspect_model(model).blocks) == []
    r = prune_model(model, 0.5)
    assert r.importance_source == "weights" and r.gates == 0 and r.max_error <= 1e-4


def test_every_source_from_the_command_line(tmp_path):
    """Each importance source reaches the plan through the CLI, and the report names it."""
    blocks = inspect_model(_bert()).blocks

    def prune(model_path, *args):
        report = tmp_path / "r.json"
        assert main([str(model_path), "--ratio", "0.5", "--dry-run", "--report", str(report), *args]) == 0
        rep = json.loads(report.read_text())
        assert rep["max_error"] <= 1e-4
        return rep["importance"], {i: tuple(b["kept_heads"]) for i, b in enumerate(rep["blocks"])}

    (tmp_path / "s.json").write_text(json.dumps({"0": [1, 2, 3, 4], blocks[1].name: [4, 3, 2, 1]}))
    assert prune(MODELS / "bert-ts.onnx", "--importance", str(tmp_path / "s.json")) == ("file", {0: (2, 3), 1: (0, 1)})
    for method in ("activation", "residual"):                  # no --calib: synthetic inputs, when asked
        assert prune(MODELS / "bert-ts.onnx", "--importance", method, "--synthetic-calib")[0] == method
    tabled = _bert()
    table = np.array([[4.0, 3, 2, 1], [1.0, 2, 3, 4]], dtype=np.float32)
    for b in blocks:
        tabled.graph.initializer.append(numpy_helper.from_array(table[1 - b.index], f"L{b.index}.my_gate"))
    onnx.save(tabled, str(tmp_path / "t.onnx"))
    assert prune(tmp_path / "t.onnx", "--importance-initializer", "*.my_gate") == \
        ("initializers", {0: (2, 3), 1: (0, 1)})
    onnx.save(_gated(_bert()), str(tmp_path / "g.onnx"))
    source, kept = prune(tmp_path / "g.onnx")
    assert source == "gates" and kept == {0: (0, 2), 1: (1, 3)}
    assert json.loads((tmp_path / "r.json").read_text())["gates_folded"] == 2


def test_a_language_models_logits_are_judged_by_next_token_kl():
    """Ablation judges an LLM on what its users see: the next-token distributions. Adding a constant to
    every logit changes none of them (KL 0, though the squared error is large); moving probability from
    one token to another does."""
    from onnxprune.calibration.session import Calibrator, is_logits, next_token_kl
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 3, 1200)).astype(np.float32)
    assert is_logits("logits", ref) and not is_logits("last_hidden_state", ref)
    assert not is_logits("logits", ref[..., :10])           # a classifier's few classes: squared error
    assert abs(next_token_kl(ref, ref + 5.0)) < 1e-9
    moved = ref.copy()
    moved[..., 0] += 4.0
    assert next_token_kl(ref, moved) > 1e-3
    cal = Calibrator.__new__(Calibrator)
    cal.outputs = ["logits"]
    assert cal.loss({"logits": ref}, {"logits": ref + 5.0}) < 1e-9
    cal.outputs = ["hidden"]
    assert cal.loss({"hidden": ref}, {"hidden": ref + 5.0}) > 1


def test_contexts_only_calibration_skips_the_outputs_and_compensates_the_same():
    """Activation scores and compensation read the heads' contexts only: their session asks ONNX Runtime for
    nothing else (an LLM's logits and the transposed tied embedding are never made), and gives the same
    scores and the same compensated weights as a session that also computes the outputs."""
    model = onnx.load(str(MODELS / "llama-ts.onnx"))
    blocks = inspect_model(model).blocks
    data = batches(synth_inputs(model, seed=3, batch=8), 4)
    full = Calibrator(model, blocks, data, progress=False)
    lean = Calibrator(model, blocks, data, progress=False, outputs=False)
    assert lean.outputs == [] and full.outputs == ["last_hidden_state"]
    assert [o.name for o in lean.session.get_outputs()] == [s.context for s in lean.sites]
    for b, s in calibrated_scores(full, "activation").items():
        assert np.allclose(s, calibrated_scores(lean, "activation")[b])
    kept = {b.index: (0, 3, 4, 7) for b in blocks}
    a, b = compensation(full, kept, "auto"), compensation(lean, kept, "auto")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(PlanError, match="contexts only"):
        lean.loss({}, {})
