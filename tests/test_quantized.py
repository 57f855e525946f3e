"""Quantized models pruned in their quantized form (quant/): made by onnxruntime's own quantizers
(tools/quantize_models.py) from a BERT with 4 heads of 64 and a Llama with 8 heads of 32 on 4 KV heads.
The exactness and shape checks of every form run with the other exports (test_equivalence.py), and so
does the check that masking the wrong heads fails; here: a wrong cut fails, what is kept stays byte for byte, blocks are cut or re-packed exactly, and what cannot be
done is refused with the way out."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import prune_model, quant
from onnxprune.quant import codes
from onnxprune.errors import PlanError, VerifyError
from onnxprune.inputs import synth_inputs
from onnxprune.verify import max_abs_diff, run

from conftest import MODELS  # noqa: E402

MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"]
QUANTIZED = sorted(n for n, v in MANIFEST.items() if v.get("quantized") and "refused" not in v)
QUANT_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits", "Cast",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _load(name):
    return onnx.load(str(MODELS / name))


def test_every_form_is_there():
    forms = {MANIFEST[n]["quantized"] for n in QUANTIZED}
    assert forms == {"dyn", "qdq", "qdq-pc", "nbits32", "nbits128", "int4qdq32", "int4qdq128", "cast", "dyn-shared",
                     "dyn-ort", "dyn-shared-ort"}
    assert {n.split("-")[0] for n in QUANTIZED} == {"bert", "llama", "albert"}


@pytest.mark.parametrize("name", QUANTIZED)
def test_pruned_model_stays_quantized_and_keeps_the_rest_byte_for_byte(name):
    """Same quantized ops, the same kind of data for every weight (nothing dequantized into floats, nothing
    re-quantized), and every initializer that pruning does not cut has its bytes."""
    model = _load(name)
    result = prune_model(model, 0.5)
    assert result.quantized and result.max_error <= 1e-4
    ops = lambda m: sorted(n.op_type for n in m.graph.node if n.op_type in QUANT_OPS)   # noqa: E731
    assert ops(result.model) == ops(model)
    before = {i.name: i for i in model.graph.initializer}
    after = {i.name: i for i in result.model.graph.initializer}
    new = set(after) - set(before)        # only the rewritten head counts of shape constants are new
    assert all(after[n].data_type == onnx.TensorProto.INT64 for n in new), new
    cut = [n for n in after if n in before and numpy_helper.to_array(after[n]).shape != numpy_helper.to_array(before[n]).shape]
    assert cut, "nothing was cut"
    for n, t in after.items():
        if n in new:
            continue
        assert t.data_type == before[n].data_type, n
        if n not in cut and not n.endswith(("_scale", "_scales", "zero_point", "zero_points")):
            assert t.SerializeToString() == before[n].SerializeToString(), n
    assert result.params_after < result.params_before


@pytest.mark.parametrize("name", ["bert-qdq-pc.onnx", "llama-dyn.onnx", "bert-nbits128.onnx"])
def test_ratio_zero_is_identity(name):
    model = _load(name)
    result = prune_model(model, 0.0)
    assert result.model.SerializeToString() == model.SerializeToString() and result.max_error == 0.0


@pytest.mark.parametrize("name, what", [("bert-qdq-pc.onnx", "scale"), ("bert-dyn.onnx", "data"),
                                        ("llama-nbits32.onnx", "scale"), ("bert-int8-cast.onnx", "data"),
                                        ("llama-int8-cast-rows.onnx", "scale"), ("bert-dyn-ort-extended.onnx", "data"),
                                        ("albert-dyn-shared-ort-extended.onnx", "data")])
def test_a_wrong_cut_of_the_quantized_data_fails_verification(monkeypatch, name, what):
    """Plant the fault: the kept columns' scales (or quantized data) taken in the wrong order. The pruned
    model still has every shape right, and verification catches it."""
    original = quant._cut

    def wrong(f, keep, arr):
        out = original(f, keep, arr)
        key = f.scale if what == "scale" else f.data
        if key in out and out[key].ndim and len(out[key]) > 1:
            out[key] = out[key][::-1].copy()
        return out
    monkeypatch.setattr(quant, "_cut", wrong)
    with pytest.raises(VerifyError, match="differs from the masked original"):
        prune_model(_load(name), 0.5)


def test_blocks_that_span_two_heads_are_repacked_exactly():
    """int4 blocks of 128 rows over heads of 64: the output projection's kept rows are re-packed into blocks
    of 64, each taking its old block's scale and zero point, so they dequantize to the very same values;
    the query/key/value projections lose whole columns."""
    model = _load("bert-nbits128.onnx")
    result = prune_model(model, kept={0: (0, 2), 1: (1, 2)})
    assert result.max_error <= 1e-4

    def float_weights(m):
        view, qv = quant.view(m, lazy=False)
        inits = {i.name: numpy_helper.to_array(i) for i in view.graph.initializer}
        return {f.data: inits[w] for w, f in qv.folded.items()}, {n.name: n for n in m.graph.node}

    before, _ = float_weights(model)
    after, nodes = float_weights(result.model)
    for b in result.blocks:
        o = nodes[f"/model/encoder/layer.{b.index}/attention/output/dense/MatMul_Q4"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in o.attribute}
        assert (attrs["K"], attrs["N"], attrs["block_size"]) == (128, 256, 64)
        rows = np.concatenate([np.arange(h * 64, (h + 1) * 64) for h in result.kept[b.index]])
        assert np.array_equal(after[o.input[1]], before[o.input[1]][rows])      # bit for bit
    q = nodes["/model/encoder/layer.0/attention/self/query/MatMul_Q4"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}
    assert (attrs["K"], attrs["N"], attrs["block_size"]) == (256, 128, 128)


def test_blocks_that_line_up_with_heads_are_kept_whole():
    """int4 blocks of 32 rows over heads of 32 (the Llama): whole blocks go, the block size stays."""
    model = _load("llama-nbits32.onnx")
    result = prune_model(model, 0.5)
    sizes = {onnx.helper.get_attribute_value(a) for n in result.model.graph.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "block_size"}
    assert sizes == {32} and result.max_error <= 1e-4


def test_rows_that_no_block_of_16_can_hold_are_refused():
    """A kept range that does not split into blocks of 16 or more inside old blocks cannot be re-packed
    exactly: refused, never re-quantized."""
    assert codes.sub_block(np.concatenate([np.arange(0, 64), np.arange(192, 256)]), 128) == 64
    assert codes.sub_block(np.arange(64, 128), 128) == 128        # one part-block: the last block may be short
    assert codes.sub_block(np.concatenate([np.arange(0, 32), np.arange(96, 128)]), 128) == 32
    assert codes.sub_block(np.arange(24, 40), 32) is None         # 8 rows on each side of a block boundary
    assert codes.sub_block(np.arange(8, 40), 32) is None          # 32 rows, but over two old blocks


def test_int4_packing_round_trips():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, (5, 3, 32)).astype(np.uint8)
    packed = codes.pack(values, 4)
    assert packed.shape == (5, 3, 16)
    assert np.array_equal(codes.unpack(packed, 4, 32), values)
    assert np.array_equal(codes.pack(np.array([[1, 2, 3]], np.uint8), 4), np.array([[0x21, 0x03]], np.uint8))


def test_an_int8_model_saved_after_ort_optimizations_is_pruned_in_its_fused_form():
    """ONNX Runtime's CPU optimizer fuses quantize_dynamic's ops into DynamicQuantizeMatMul (one weight per input)
    and MatMulIntegerToFloat (several weights of one input: a DynamicQuantizeLinear before them), the scores into
    FusedMatMul and the bias Adds into both. Those are quantized forms too (before: refused): the model is
    pruned in them, every weight still int8, its scale, zero point and bias cut with its columns; with one
    ALBERT layer's weights read by both blocks as well."""
    from collections import Counter
    for name in ("bert-dyn-ort-extended.onnx", "albert-dyn-shared-ort-extended.onnx"):
        model = _load(name)
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["DynamicQuantizeMatMul"] and ops["MatMulIntegerToFloat"] and not ops["MatMulInteger"]
        for ratio in (0.25, 0.5):
            r = prune_model(model, ratio)
            assert r.max_error <= 1e-4 and r.params_after < r.params_before
            after = Counter(n.op_type for n in r.model.graph.node)
            assert all(after[op] == ops[op] for op in QUANT_OPS | {"FusedMatMul"})
    labels = prune_model(_load("bert-dyn-ort-extended.onnx"), 0.5).quantized
    assert labels == "int8 dynamic fused by ORT (DynamicQuantizeMatMul), int8 dynamic fused by ORT (MatMulIntegerToFloat)"


@pytest.mark.parametrize("name", ["bert-qdq-pc.onnx", "llama-dyn.onnx", "llama-nbits32.onnx"])
def test_compensation_is_refused_since_it_would_requantize(name):
    model = _load(name)
    feeds = synth_inputs(model, batch=4)
    with pytest.raises(PlanError, match="re-quantize; compensate the float model, then quantize it"):
        prune_model(model, 0.5, calib=feeds, compensate="auto")


@pytest.mark.parametrize("name", ["bert-qdq-pc.onnx", "llama-nbits32.onnx"])
def test_calibrated_importance_runs_on_the_float_view(name):
    """Calibration runs the float view (dequantized weights): its scores differ between heads, they pick
    the heads, and the quantized model pruned by them equals its masked reference."""
    model = _load(name)
    feeds = synth_inputs(model, batch=8)
    result = prune_model(model, 0.5, importance="ablation", calib=feeds)
    assert result.max_error <= 1e-4 and result.importance_source == "ablation"
    for b in result.blocks:
        scores = result.importance[b.index]
        assert np.all(np.isfinite(scores)) and np.ptp(scores) > 0


def test_weight_scores_come_from_the_dequantized_weights():
    """Per-channel scales weigh each column differently: scores from the raw int8 data would not be the
    scores of the weights the model computes with. The quantized model's scores are its float view's."""
    model = _load("llama-qdq-pc.onnx")
    view, _ = quant.view(model, lazy=False)
    assert all(np.allclose(a, b) for a, b in zip(prune_model(model, 0.5, verify=False).importance.values(),
                                                 prune_model(view, 0.5, verify=False).importance.values()))


def test_scores_stored_in_a_quantized_model_are_used():
    """`onnxprune score` on a quantized model stores its scores beside the quantized weights; pruning it
    later reads them (the float view keeps them)."""
    from onnxprune.api import score_model
    scored, _, scores = score_model(_load("bert-qdq-pc.onnx"), "weights")
    result = prune_model(scored, 0.5)
    assert result.importance_source == "initializers (weights)" and result.max_error <= 1e-4
    for b in result.blocks:
        assert np.allclose(result.importance[b.index], scores[b.index])


@pytest.mark.parametrize("name", ["bert-dyn.onnx", "llama-qdq-pc.onnx", "llama-nbits128.onnx",
                                  "llama-int4qdq32.onnx"])
def test_weights_outside_the_blocks_are_never_dequantized(monkeypatch, name):
    """An int4 LLM dequantized whole would take 8 times its size: the float view keeps large weights as
    placeholders (shapes only; reading one fails) and dequantizes the blocks' weights alone, or all of them
    for calibration. Here every weight matrix counts as large: the pruned model is the same, byte for byte, and
    the MLP weights are never read."""
    from onnxprune.model import dtypes as probe
    model = _load(name)
    eager = prune_model(model, 0.5)
    monkeypatch.setattr(quant, "LAZY_FROM", 1024)          # every weight matrix here; no scale or bias
    monkeypatch.setattr(probe, "STAND_IN_BYTES", 1024)
    read = []
    real = quant._float_weight
    monkeypatch.setattr(quant, "_float_weight", lambda f, arrays: read.append(f.weight) or real(f, arrays))
    lazy = prune_model(model, 0.5)
    assert lazy.kept == eager.kept and lazy.max_error == eager.max_error
    a, b = ({i.name: i.SerializeToString() for i in r.model.graph.initializer} for r in (eager, lazy))
    named = [k for k in a if "__onnxprune" not in k]           # rewritten shape constants get fresh names
    assert len(a) == len(b) and all(a[k] == b[k] for k in named)
    feeds = synth_inputs(model, seed=2)
    assert max_abs_diff(run(eager.model, feeds), run(lazy.model, feeds)) == 0
    in_blocks = {t.name for b in lazy.blocks for t in b.tensors if t.constant}
    assert read and set(read) <= in_blocks
    view, qv = quant.view(model)
    assert qv.lazy and all(i.data_location == onnx.TensorProto.EXTERNAL for i in view.graph.initializer
                           if i.name in qv.lazy)
    feeds = synth_inputs(model, batch=4)
    assert prune_model(model, 0.5, importance="activation", calib=feeds).max_error <= 1e-4   # all dequantized


def test_head_gates_in_a_quantized_model_are_refused():
    """Folding a gate multiplies the output projection's rows: a quantized projection would have to be
    re-quantized, so it is refused, with the way out."""
    from conftest import gated
    with pytest.raises(PlanError, match="head gates .* would re-quantize them; fold or prune the float model"):
        prune_model(gated(_load("bert-dyn.onnx")), 0.5)


def test_int8_written_by_hand_is_a_quantized_weight_and_a_cast_alone_is_not():
    """int8 -> Cast -> Mul by a scale per column (BERT) or per row (Llama, 8 heads on 2 KV heads): every block
    found (before: 0, "no query projection weight found above the attention"), pruned in its integer form at
    several ratios and random keep sets, equal to the masked original. A Cast of int8 data that no Mul by a
    scale follows is not a weight form: such a model is a float model."""
    import numpy as np
    from onnxprune.api import inspect_model
    for name in ("bert-int8-cast.onnx", "llama-int8-cast-rows.onnx"):
        model = _load(name)
        assert quant.is_quantized(model) and len(inspect_model(model).blocks) == 2
        for ratio in (0.25, 0.5, 0.75):
            r = prune_model(model, ratio)
            assert r.max_error <= 1e-4 and r.quantized == "int8 by Cast and Mul"
            ints = [i for i in r.model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
            assert len(ints) == len([i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8])
        rng = np.random.default_rng(0)
        blocks = inspect_model(model).blocks
        for _ in range(3):
            kept = {b.index: sorted(h for g in b.kv_groups for h in rng.choice(g, size=max(1, len(g) // 2),
                                                                                replace=False)) for b in blocks}
            assert prune_model(model, kept=kept).max_error <= 1e-4
    plain = _load("bert-ts.onnx")
    plain.graph.initializer.append(numpy_helper.from_array(np.ones((2, 2), np.int8), "table"))
    plain.graph.node.insert(0, onnx.helper.make_node("Cast", ["table"], ["table_f"], to=onnx.TensorProto.FLOAT))
    plain.graph.output.append(onnx.helper.make_tensor_value_info("table_f", onnx.TensorProto.FLOAT, [2, 2]))
    assert not quant.is_quantized(plain)


def test_a_quantized_weight_read_by_several_blocks_is_one_weight_of_the_view():
    """models/albert-dyn-shared.onnx: each int8 weight of ALBERT's one layer is read by two MatMulInteger nodes.
    The float view holds one float weight per quantized weight, read by both (before: one per reader under one
    name, an invalid model); the blocks are tied and cut once, and every int8 weight is still read by both.
    Heads that differ between the blocks are refused in one line (the integers cannot be cut two ways)."""
    from collections import Counter
    from onnxprune.errors import RewriteError
    model = _load("albert-dyn-shared.onnx")
    readers = Counter(n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger")
    assert sorted(readers.values()) == [1] + [2] * 6
    view, qv = quant.view(model, lazy=False)
    assert len({i.name for i in view.graph.initializer}) == len(view.graph.initializer)
    assert sum(len(v) for v in qv.more.values()) == 6
    for ratio in (0.25, 0.5, 0.75):
        r = prune_model(model, ratio)
        assert r.max_error <= 1e-4 and r.params_after < r.params_before
        assert len(set(r.kept.values())) == 1
        after = Counter(n.input[1] for n in r.model.graph.node if n.op_type == "MatMulInteger")
        assert sorted(after.values()) == sorted(readers.values())
    with pytest.raises(RewriteError, match="give those blocks the same heads"):
        prune_model(model, kept={0: [0, 1, 2, 3], 1: [0, 1]})


def test_a_copy_of_the_model_that_onnxruntime_will_not_load_is_onnxprunes_fault_not_the_models(monkeypatch):
    """The probe runs a light copy of the model (and, for a quantized one, of its float view): when onnxruntime
    refuses the copy, the message says it is onnxprune's fault, never that the model or its inputs are bad."""
    from onnxprune import probe as probing
    from onnxprune.errors import InputError, OnnxPruneError
    real = probing.light_copy

    def broken(model):
        copy, stand_ins = real(model)
        copy.graph.node.append(onnx.helper.make_node("Relu", ["no such tensor"], ["x_"], name="broken"))
        return copy, stand_ins
    monkeypatch.setattr(probing, "light_copy", broken)
    for name, words in (("bert-ts.onnx", "probe copy of the model"), ("bert-dyn.onnx", "float view")):
        with pytest.raises(OnnxPruneError, match=f"{words}.*a fault of onnxprune, not of the model") as info:
            prune_model(_load(name), 0.5)
        assert not isinstance(info.value, InputError)
    monkeypatch.setattr(probing, "light_copy", real)
    bad = _load("bert-ts.onnx")
    bad.graph.node.append(onnx.helper.make_node("Relu", ["no such tensor"], ["x_"], name="broken"))
    with pytest.raises(InputError, match="onnxruntime cannot load the model"):
        probing.probe(bad)


def test_the_forms_are_found_by_themselves_and_a_kind_declared_twice_fails(monkeypatch):
    """Each quantized form is one module of quant/forms/ declaring FORM; the registry finds them, and a second
    module declaring a kind already taken is refused when the registry is built."""
    from types import SimpleNamespace

    from onnxprune.quant import forms
    assert {k: f.label for k, f in forms.FORMS.items()} == {
        "dq": "QDQ", "integer": "int8 dynamic (MatMulInteger)", "nbits": "MatMulNBits", "cast": "int8 by Cast and Mul",
        "dqmatmul": "int8 dynamic fused by ORT (DynamicQuantizeMatMul)",
        "inttofloat": "int8 dynamic fused by ORT (MatMulIntegerToFloat)"}
    real = forms.importlib.import_module
    monkeypatch.setattr(forms.importlib, "import_module", lambda name: SimpleNamespace(FORM=forms.FORMS["dq"])
                        if name.endswith(".nbits") else real(name))
    with pytest.raises(ValueError, match="'dq' is declared twice"):
        forms._discover()


# ------------------------------------------------------------------ MACs of the quantized forms
def _float_count(model, blocks, batch, seq):
    """The MACs of ``model``'s float view (every quantized weight dequantized into a plain MatMul), per block
    by the view's own weight names: the count that the quantized ops must equal."""
    from onnxprune.macs import block_nodes, count_macs
    float_model, _ = quant.view(model, lazy=False)
    return count_macs(float_model, blocks, batch, seq, block_node_names=block_nodes(float_model, blocks))


@pytest.mark.parametrize("name", QUANTIZED + ["llama-genai-int4/model.onnx", "gemma3-genai-int4/model.onnx"])
@pytest.mark.parametrize("batch, seq", [(1, 16), (2, 7)])
def test_a_quantized_model_counts_the_macs_of_its_float_model(name, batch, seq):
    """MatMulNBits, MatMulInteger and QDQ MatMuls count as the float products they stand for, in total and
    per block; so the ideal speed-up of a cut is that of the float model (before, the int4 and int8 dynamic
    forms left their projections out: an ideal 2.00x where the float model's is 1.67x)."""
    from onnxprune.api import count_result_macs, inspect_model
    model = _load(name)
    external = MODELS / name.split("/")[0] if "/" in name else None
    blocks = inspect_model(model, external).blocks
    pruned = prune_model(model, 0.5, verify=False, external_dir=external)
    before, after = count_result_macs(model, pruned, batch, seq, external).macs
    want = _float_count(model, blocks, batch, seq)
    assert before.total == want.total and before.blocks == want.blocks
    assert all(v > 0 for v in want.blocks.values())
    cut = _float_count(pruned.model, blocks, batch, seq)
    assert after.total == cut.total and after.blocks == cut.blocks
    assert before.ideal_speedup(after) == pytest.approx(want.ideal_speedup(cut), rel=0.02)
    assert before.ideal_speedup(after) < 1.9     # the projections count: far from the 2x of the scores alone


@pytest.mark.parametrize("pair", [("llama-genai-int4", "llama-genai"), ("gemma3-genai-int4", "gemma3-genai")])
def test_an_int4_folder_has_the_ideal_speed_up_of_its_fp32_folder(pair):
    from onnxprune.api import count_result_macs
    ideal = []
    for folder in pair:
        model = onnx.load(str(MODELS / folder / "model.onnx"))
        result = prune_model(model, 0.5, verify=False, external_dir=MODELS / folder)
        before, after = count_result_macs(model, result, 1, 32, MODELS / folder).macs
        ideal.append((before.total, before.ideal_speedup(after)))
    assert ideal[0] == ideal[1]


def test_quantized_ops_the_tool_does_not_prune_are_counted_too(tmp_path):
    """The int8 model after ONNX Runtime's optimizer (DynamicQuantizeMatMul, MatMulIntegerToFloat, FusedMatMul)
    and in operator form (QLinearMatMul, which the prune refuses) count the products of the model that they were
    made from."""
    import onnxruntime as ort
    from onnxprune.macs import count_macs
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(MODELS / "bert-dyn.onnx"), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(so.optimized_model_filepath)
    ops = {n.op_type for n in optimized.graph.node}
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} & ops and "MatMulInteger" not in ops
    want = _float_count(_load("bert-dyn.onnx"), [], 2, 9).total
    assert count_macs(optimized, [], 2, 9).total == want
    assert count_macs(_load("bert-qop.onnx"), [], 2, 9).total == want


@pytest.mark.parametrize("folder", ["llama-genai-int4", "llama-genai"])
def test_the_report_prices_a_decode_step_by_the_bytes_it_reads(tmp_path, folder):
    """Per token at batch B and C cached tokens: the weights as stored (the data file's bytes, int4 packed) over
    B, plus C tokens of K and V (2 layers x 2 KV heads of 16, fp32). --gqa group at 0.5 halves the cache."""
    from onnxprune.cli import main
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main([str(MODELS / folder), "--ratio", "0.5", "--gqa", "group", "--batch", "4", "--context", "512",
                 "-o", f"{out}/", "--report", str(report)]) == 0
    decode = json.loads(report.read_text())["decode_bytes_per_token"]
    assert (decode["batch"], decode["context"]) == (4, 512)
    kv = 2 * 2 * 2 * 16 * 4
    data = [(d / "model.onnx.data").stat().st_size for d in (MODELS / folder, out)]
    assert decode["before"] == data[0] // 4 + kv * 512
    assert decode["after"] == data[1] // 4 + kv // 2 * 512
