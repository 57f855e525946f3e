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


@pytest.mark.parametrize("name", ["gpt2-ts.onnx", "llama-ts.onnx", "gemma3-ts.onnx"])
def test_the_probe_needs_no_weights(small_thresholds, name):
    """The probe's copy holds no large weight: each becomes a stand-in of one value, made before its first reader,
    and a weight that only MatMul or an embedding's Gather reads is not made at all (its readers computed from a
    row sum or a one-row table); the shapes and small values are those of a run with the weights."""
    from onnxprune.probe import light_copy
    from onnxprune.model.proto import large_weights
    model = onnx.load(str(ROOT / "models" / name))
    copy, _ = light_copy(model)
    made = {n.output[0] for n in copy.graph.node if n.name.endswith("__stand_in")}
    large = large_weights(model, 1024)
    assert large and not large & {t.name for t in copy.graph.initializer}
    assert len(made) < len(large)
    assert any(n.op_type == "Gather" and n.input[1].endswith("__light_zeros") for n in copy.graph.node)
    assert name == "gpt2-ts.onnx" or any(n.name.endswith("__light_sum") for n in copy.graph.node)   # (Gemm there)
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


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the high-water mark from /proc")
def test_an_fp16_model_is_probed_in_fp32_without_a_copy_of_its_weights(tmp_path):
    """ONNX Runtime's CPU provider casts fp16 weights to fp32 for its MatMuls, and the probe's stand-ins were all
    made and cast before the first layer ran: a 1.5 GB fp16 model took 2.43 GiB to probe (`onnxprune inspect`),
    a 130 MB one 216 MB. The probe now runs its copy in fp32 (the same shapes), each stand-in made just before
    its first reader, in ONNX Runtime's priority order: 0.35 GiB, and 58 MB for this 260 MB one (412 MB before)."""
    from onnxprune.model.dtypes import HALF_TYPES as HALF
    from onnxprune.probe import in_fp32, light_copy
    path = build(tmp_path, 0, hidden=1024, heads=8, ffn=2048, vocab=1000, layers=16, fp16=True)
    size = (tmp_path / "model.onnx.data").stat().st_size
    code = ("import psutil\nfrom onnxprune.model.load import load_model\nfrom onnxprune.probe import probe\n"
            f"m = load_model({str(path)!r}, external_data=False)\nbefore = psutil.Process().memory_info().rss\n"
            f"probe(m, external_dir={str(tmp_path)!r})\n"
            # the high-water mark of this process's own memory: ru_maxrss would keep the forked parent's
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(before, peak * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = map(int, out.stdout.split())
    assert size > 250 * 2**20 and peak - before < 0.5 * size, (size, peak - before)
    model = onnx.load(str(path), load_external_data=False)
    copy, stand_ins = light_copy(model)
    order = [n.name for n in copy.graph.node]
    for n in copy.graph.node:          # each stand-in right before the node that first reads it
        if n.name.endswith("__stand_in"):
            reader = next(m for m in copy.graph.node if n.output[0] in m.input)
            assert order.index(reader.name) == order.index(n.name) + 1
    assert in_fp32(copy, tmp_path)
    assert not any(t.data_type in HALF for t in copy.graph.initializer)
    assert not any(v.type.tensor_type.elem_type in HALF for v in list(copy.graph.input) + list(copy.graph.output))


def test_sessions_run_in_priority_order():
    import onnxruntime as ort
    sess = session(onnx.load(str(ROOT / "models" / "bert-ts.onnx")))
    assert sess.get_session_options().execution_order == ort.ExecutionOrder.PRIORITY_BASED


@pytest.mark.parametrize("name", ["bert-ts.onnx", "llama-ts.onnx", "t5-ts.onnx", "gemma3-genai/model.onnx",
                                  "whisper-ort-decoder.onnx", "llama-nbits32.onnx", "bert-ort-attention-fp16.onnx"])
def test_a_model_run_in_segments_gives_its_outputs_bit_for_bit(name):
    """``segments.run_segmented`` cuts the nodes into segments of a few KB of weights here (256 MiB by default),
    runs each as a model of its own on what the earlier ones made and keeps only what later ones read: the
    outputs are those of the whole run, exactly (a KV cache, quantized weights, fp16 too)."""
    from onnxprune.segments import run_segmented, segments
    from onnxprune.verify import filled_cache, run
    path = ROOT / "models" / name
    model = onnx.load(str(path))
    folder = path.parent if "/" in name else None
    feeds = synth_inputs(model)
    whole = run(model, feeds, folder)
    assert len(segments(model, 20000)) >= 3
    parts = run_segmented(model, feeds, folder, budget=20000)
    assert parts.keys() == whole.keys()
    # a sliding-window cache's unwritten entries hold whatever memory held (``verify.filled_cache``)
    whole, parts = filled_cache(whole, feeds), filled_cache(parts, feeds)
    assert all(np.array_equal(parts[k], whole[k], equal_nan=True) for k in whole)


def test_the_proof_in_segments_proves_and_can_fail(monkeypatch):
    """``--proof segments`` runs both models of the proof in segments: the same error as the whole proof; a plan
    whose reference masks other heads fails it; ``auto`` takes segments where the models would not fit in the
    memory available (planted: 64 KB available)."""
    import psutil
    from types import SimpleNamespace
    from onnxprune import pipeline, prune_model
    from onnxprune.errors import VerifyError
    from onnxprune.report import build_report, format_table
    model = onnx.load(str(ROOT / "models" / "llama-ts.onnx"))
    whole = prune_model(model, 0.5, proof="whole")
    parts = prune_model(model, 0.5, proof="segments")
    assert whole.proof_segment_bytes is None and parts.proof_segment_bytes
    assert parts.max_error == whole.max_error and parts.max_error <= 1e-4
    assert build_report(parts, "m", None, 0.5)["proof"]["run"] == "segments"
    assert "in segments of at most" in format_table(build_report(parts, "m", None, 0.5))
    real = pipeline.reference

    def wrong(model, blocks, plans, quant, external_dir):      # the reference masks the kept heads instead
        flipped = {i: p.__class__(tuple(h for h in range(b.num_heads) if h not in p.kept_heads) or (0,))
                   for (i, p), b in zip(plans.items(), blocks)}
        return real(model, blocks, flipped, quant, external_dir)
    monkeypatch.setattr(pipeline, "reference", wrong)
    with pytest.raises(VerifyError):
        prune_model(model, 0.5, proof="segments")
    monkeypatch.setattr(pipeline, "reference", real)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 16))
    from onnxprune.segments import budget_for
    assert budget_for(model, "auto") and budget_for(model, "whole") is None
    auto = prune_model(model, 0.5)          # too big to run whole: block by block
    assert auto.proof_run == "blocks" and auto.proof_segment_bytes is None and auto.max_error <= 1e-4
    assert "proof: block by block" in format_table(build_report(auto, "m", None, 0.5))
    assert build_report(auto, "m", None, 0.5)["proof"]["run"] == "blocks"
    quantized = prune_model(onnx.load(str(ROOT / "models" / "llama-qdq.onnx")), 0.5)   # no block proof: segments
    assert quantized.proof_run == "segments" and quantized.proof_segment_bytes == 1 << 20
    assert "quantized model" in quantized.proof_note
    assert "block by block not possible" in format_table(build_report(quantized, "m", None, 0.5))


def test_the_proof_is_chosen_on_the_command_line_and_reported(tmp_path):
    from onnxprune.errors import PlanError
    from onnxprune.options import PruneOptions
    from conftest import cli
    with pytest.raises(PlanError, match="unknown proof 'halves'"):
        PruneOptions(ratio=0.5, proof="halves")
    r = cli(ROOT / "models" / "bert-ts.onnx", "--ratio", "0.5", "--proof", "segments", "--dry-run",
            "--report", tmp_path / "r.json")
    assert r.returncode == 0 and "in segments of at most" in r.stdout, r.stderr
    import json
    assert json.loads((tmp_path / "r.json").read_text())["proof"]["run"] == "segments"
    r = cli(ROOT / "models" / "bert-ts.onnx", "--ratio", "0.5", "--proof", "whole", "--dry-run")
    assert r.returncode == 0 and "segments" not in r.stdout
    r = cli(ROOT / "models" / "bert-ts.onnx", "--ratio", "0.5", "--proof", "blocks", "--dry-run",
            "--report", tmp_path / "b.json")
    assert r.returncode == 0 and "proof: block by block" in r.stdout, r.stderr
    assert json.loads((tmp_path / "b.json").read_text())["proof"]["run"] == "blocks"
    r = cli(ROOT / "models" / "bert-ts.onnx", "--ratio", "0.5", "--proof", "halves")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.parametrize("kw", [dict(ratio=0.5, compensate="auto"), dict(attention_ratio=0.5)])
def test_calibration_runs_in_segments_too_and_plans_the_same(kw, monkeypatch):
    """Where the model would not fit, calibration (scores, compensation, the fits and the budget's pricing) runs
    it in segments as the proof does: the same plan and the same compensated weights as a whole run, and a proved
    model; the segments are really run (counted)."""
    from onnxprune import prune_model, segments
    model = onnx.load(str(ROOT / "models" / "llama-ts.onnx"))
    calib = synth_inputs(model, seed=3, batch=16, seq=12)
    whole = prune_model(model, calib=calib, proof="whole", **kw)
    calls = []
    real = segments.Segmented.advance

    def counted(self, s, states, extra=None):
        calls.append(s)
        return real(self, s, states, extra)
    monkeypatch.setattr(segments.Segmented, "advance", counted)
    parts = prune_model(model, calib=calib, proof="segments", **kw)
    assert calls
    assert parts.kept == whole.kept and parts.max_error <= 1e-4 and parts.proof_segment_bytes
    assert [(f.block, f.circuit, f.rank) for f in parts.dim_fits] == [(f.block, f.circuit, f.rank) for f in whole.dim_fits]
    _same_outputs(whole.model, parts.model)


def _same_outputs(a, b):
    from onnxprune.verify import run
    feeds = synth_inputs(a, seed=11, batch=2, seq=7)
    x, y = run(a, feeds), run(b, feeds)
    assert x.keys() == y.keys() and all(np.allclose(x[k], y[k], atol=1e-4) for k in x)


def test_compensation_in_segments_takes_a_few_passes_not_one_per_block(monkeypatch):
    """Compensated in segments, each block sees the blocks compensated before it (the same weights as the whole
    walk, which runs the model once per block) in about three passes over the segments: the original's, the fed
    model's, and once more each segment that makes a compensated block's context: each segment's session made
    once."""
    from onnxprune import prune_model, segments
    model = onnx.load(str(ROOT / "models" / "llama-gqa4-ts.onnx"))
    calib = synth_inputs(model, seed=5, batch=8, seq=10)
    made = []
    real = segments.Segmented._session

    def counted(self, s, like):
        if self._open is None or self._open[0] != s:
            made.append(s)
        return real(self, s, like)
    monkeypatch.setattr(segments.Segmented, "_session", counted)
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 40000)
    monkeypatch.setattr(segments, "budget_for", lambda model, mode="auto", share=0.6: 40000)
    from onnxprune.calibration import session as cal_session
    monkeypatch.setattr(cal_session, "budget_for", lambda model, mode="auto", share=0.6: 40000)
    from onnxprune.transforms import compensate
    walked = []
    real_walk = cal_session.Calibrator.walk

    def walk(self, fed, needed):
        n = len(made)
        for item in real_walk(self, fed, needed):
            yield item
        walked.append((len(made) - n, len(self.sites), len(segments.segments(self.work, 40000))))
    monkeypatch.setattr(cal_session.Calibrator, "walk", walk)
    got = prune_model(model, 0.5, calib=calib, compensate="refit", proof="whole")
    monkeypatch.undo()
    want = prune_model(model, 0.5, calib=calib, compensate="refit", proof="whole")
    assert compensate and walked
    sessions, blocks, parts = walked[0]
    assert blocks >= 2 and parts >= 2 * blocks
    # each segment's session is made once, and serves the original's state, the fed model's and the sites' reruns
    # (a pass per block would make blocks * parts)
    assert sessions <= parts, (sessions, parts)
    _same_outputs(got.model, want.model)


def test_calibration_and_the_proof_run_on_the_provider_asked_for(monkeypatch):
    """``--provider cuda`` puts calibration and the proof on CUDA (TF32 off for the proof); without onnxruntime-gpu
    it is refused in one line before any work. Planted: an onnxruntime that lists CUDA, whose sessions are
    counted, not made on a GPU."""
    import onnxruntime as ort
    from onnxprune import prune_model, runtime
    from onnxprune.errors import InputError
    from conftest import cli
    model = onnx.load(str(ROOT / "models" / "llama-ts.onnx"))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="CUDAExecutionProvider is not available"):
            prune_model(model, 0.5, provider="cuda")
        r = cli(ROOT / "models" / "llama-ts.onnx", "--ratio", "0.5", "--provider", "cuda", "--dry-run")
        assert r.returncode == 2 and "install onnxruntime-gpu" in r.stderr and "Traceback" not in r.stderr
    seen = []
    real = runtime.session

    def counted(model, optimize=False, providers=None, **kw):
        seen.append(providers)
        return real(model, optimize=optimize, providers=["CPUExecutionProvider"], **kw)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    for module in ("onnxprune.verify", "onnxprune.segments", "onnxprune.calibration.session"):
        monkeypatch.setattr(f"{module}.session", counted)
    calib = synth_inputs(model, seed=3, batch=8, seq=8)
    result = prune_model(model, 0.5, calib=calib, compensate="auto", provider="cuda")
    assert result.max_error <= 1e-4
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    exact = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert cuda in seen and exact in seen and None not in seen     # calibration, then the proof; nothing on CPU
    seen.clear()
    prune_model(model, 0.5, calib=calib, compensate="auto", proof="segments", provider="cuda")
    assert seen and all(p in (cuda, exact) for p in seen)


def test_export_lets_each_large_cut_weight_go_once_written():
    """``model.graph.export_light`` writes each large in-memory constant into its initializer one at a time and
    empties the graph's copy: the same model as onnx-graphsurgeon's export, without a second and third copy of every
    cut weight alive at once."""
    import onnx_graphsurgeon as gs
    from onnxprune.model.graph import export_light, to_graph
    model = onnx.load(str(ROOT / "models" / "llama-ts.onnx"))
    plain = gs.export_onnx(to_graph(model), do_type_check=False)
    graph = to_graph(model)
    big = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.values.nbytes >= 4096]
    light = export_light(graph, 4096)
    assert big and all(t.values.size == 0 for t in big)
    a = {t.name: t for t in plain.graph.initializer}
    assert [t.name for t in light.graph.initializer] == list(a)
    for t in light.graph.initializer:
        assert np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(a[t.name])), t.name


def test_a_failure_inside_the_segmented_walk_is_one_line(monkeypatch):
    """onnxruntime failing while compensation walks the segments (planted: a segment that raises) is an
    ``InputError`` in one line, as a failing calibration run is elsewhere."""
    from onnxprune import segments
    from onnxprune.calibration import session as cal_session
    from onnxprune.calibration.session import Calibrator
    from onnxprune.errors import InputError
    from onnxprune.api import inspect_model
    model = onnx.load(str(ROOT / "models" / "llama-ts.onnx"))
    blocks = inspect_model(model).blocks
    cal = Calibrator(model, blocks, [synth_inputs(model, seed=4, batch=2, seq=5)], progress=False, outputs=False,
                     segment_bytes=40000)
    monkeypatch.setattr(segments.Segmented, "advance", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom\nx")))
    assert cal_session.Segmented is segments.Segmented
    with pytest.raises(InputError, match="onnxruntime could not run the model on the calibration data: boom"):
        next(cal.walk({}, {b.index for b in blocks}))
