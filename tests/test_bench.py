"""MAC accounting counted by hand, `--multiple-of`, and `onnxprune bench` (that it runs; no timing asserted)."""

import json

import numpy as np
import onnx
import pytest

from onnxprune.errors import PlanError

from onnxprune import prune_model
from onnxprune.api import count_result_macs, inspect_model
from onnxprune.cli import main
from onnxprune.macs import count_macs
from onnxprune.plan import align_heads
from onnxprune.inputs import synth_inputs

from conftest import MODELS


def _bert_by_hand(batch, seq, heads_kept, heads=4, hidden=32, inner=64, layers=2):
    """BERT (tools/export_models.py: hidden 32, 4 heads, FFN 64, 2 layers): Q, K, V and O, the score and
    context products, and the FFN; a pruned block keeps ``heads_kept`` heads of size hidden / heads."""
    width = hidden // heads * heads_kept
    attention = 4 * batch * seq * hidden * width + 2 * batch * seq * seq * width
    ffn = 2 * batch * seq * hidden * inner
    return attention, layers * (attention + ffn)


@pytest.mark.parametrize("name", ["bert-ts.onnx", "bert-d18.onnx", "bert-d23-sdpa.onnx",
                                  "bert-ort-attention.onnx", "bert-ort-mha.onnx"])
@pytest.mark.parametrize("batch,seq", [(1, 32), (3, 7)])
def test_bert_macs_match_the_hand_count(name, batch, seq):
    """Plain exports and ORT's fused forms (Attention with its packed projection, MultiHeadAttention) all
    count the same dense products."""
    model = onnx.load(str(MODELS / name))
    result = prune_model(model, 0.5, verify=False)
    result = count_result_macs(model, result, batch, seq)
    before, after = result.macs
    attention, total = _bert_by_hand(batch, seq, 4)
    assert before.blocks == {0: attention, 1: attention}
    assert before.total == total
    attention, total = _bert_by_hand(batch, seq, 2)
    assert after.blocks == {0: attention, 1: attention}
    assert after.total == total


def test_grouped_query_macs_by_hand():
    """Llama (hidden 64, 8 query heads, 2 KV heads of 8, FFN 64 with a gate) and the GenAI builder's
    GroupQueryAttention (hidden 128, 8 + 2 + 2 heads of 16 in one packed projection)."""
    b, s = 2, 16
    model = onnx.load(str(MODELS / "llama-d18.onnx"))
    blocks = inspect_model(model).blocks
    count = count_macs(model, blocks, b, s)
    per_block = b * s * 64 * (64 + 16 + 16 + 64) + 2 * b * 8 * s * s * 8
    assert count.blocks == {0: per_block, 1: per_block}
    assert count.total == 2 * (per_block + 3 * b * s * 64 * 64)      # + gate, up and down (LlamaModel: no head)

    genai = onnx.load(str(MODELS / "llama-genai" / "model.onnx"))
    count = count_macs(genai, inspect_model(genai).blocks, 1, s)
    per_block = s * 128 * 192 + s * 128 * 128 + 2 * 8 * s * s * 16
    assert count.blocks == {0: per_block, 1: per_block}


def test_a_multi_query_block_counts_its_one_key_projection():
    """Gemma 3's one K head is gathered at its broadcast (its norm and rotary embedding lie above it), so the
    block does not follow it up to its projection: the count still finds that product (hidden 32, 4 query heads
    and 1 KV head of 8), before and after a cut through the q norm."""
    b, s = 2, 16
    model = onnx.load(str(MODELS / "gemma3-mqa-d18.onnx"))
    count = count_macs(model, inspect_model(model).blocks, b, s)
    per_block = b * s * 32 * (32 + 8 + 8 + 32) + 2 * b * 4 * s * s * 8
    assert set(count.blocks.values()) == {per_block}
    pruned = prune_model(model, qk_dims=0.5, calib=synth_inputs(model, seed=1, batch=8, seq=8))
    cut = count_result_macs(model, pruned, b, s)
    per_block = b * s * 32 * (16 + 8 + 8 + 32) + b * 4 * s * s * (4 + 8)       # Q and the scores at rank 4
    assert set(cut.macs[1].blocks.values()) == {per_block}


def test_a_length_the_model_cannot_take_is_explained_not_fatal():
    model = onnx.load(str(MODELS / "bert-ts.onnx"))      # 64 positions
    result = count_result_macs(model, prune_model(model, 0.5, verify=False), 1, 128)
    assert result.macs is None
    assert "does not run at batch 1, seq 128" in result.macs_note and "\n" not in result.macs_note
    shrunk = count_result_macs(model, prune_model(model, 0.5, verify=False), 1, 128, shrink=True)
    assert shrunk.macs[0].seq == 64 and shrunk.macs[0].total == _bert_by_hand(1, 64, 4)[1]
    assert "does not run at seq 128; MACs counted at seq 64" in shrunk.macs_note


def test_unnamed_dynamic_axes_take_the_batch_on_the_first_axis():
    model = onnx.load(str(MODELS / "bert-d18.onnx"))     # dynamo names its axes s21, s50...
    feeds = synth_inputs(model, batch=3, seq=11)
    assert feeds["input_ids"].shape == (3, 11)


def test_align_heads_rounds_up_with_the_next_best():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8]
    assert align_heads([0, 5], scores, [[h] for h in range(6)], 32, 64) == (0, 5)
    assert align_heads([0], scores, [[h] for h in range(6)], 32, 64) == (0, 5)
    assert align_heads([0, 5], scores, [[h] for h in range(6)], 32, 96) == (0, 3, 5)
    with pytest.raises(PlanError, match="multiple of 1000"):          # none aligned, not even all heads
        align_heads([0], scores, [[h] for h in range(6)], 24, 1000)
    groups = [[0, 1, 2], [3, 4, 5]]
    assert align_heads([0, 3], scores, groups, 8, 32, "uniform") == (0, 2, 3, 5)     # one more per group
    assert align_heads([0, 1, 2], scores, groups, 8, 48, "group") == tuple(range(6))  # whole groups


def test_multiple_of_prunes_exactly(tmp_path):
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main([str(MODELS / "llama-d18.onnx"), "--ratio", "0.5", "--multiple-of", "24", "--seq", "16",
                 "-o", str(out), "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["multiple_of"] == 24 and rep["max_error"] <= 1e-4
    for b in rep["blocks"]:
        assert len(b["kept_heads"]) * b["head_dim"] % 24 == 0 and len(b["kept_heads"]) == 6   # 4 -> 6 (2 groups)
    assert rep["macs"]["seq"] == 16 and rep["macs"]["after"] < rep["macs"]["before"]
    assert rep["macs"]["ideal_speedup"] == pytest.approx(rep["macs"]["before"] / rep["macs"]["after"])


def test_multiple_of_needs_a_ratio(tmp_path):
    heads = tmp_path / "h.json"
    heads.write_text('{"0": [1]}')
    assert main([str(MODELS / "bert-ts.onnx"), "--heads-to-prune", str(heads), "--multiple-of", "8",
                 "--dry-run"]) == 4


def test_bench_runs_and_reports(tmp_path, capsys):
    pruned, out = tmp_path / "p.onnx", tmp_path / "bench.json"
    assert main([str(MODELS / "bert-ts.onnx"), "--ratio", "0.5", "-o", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["bench", str(MODELS / "bert-ts.onnx"), str(pruned), "--seq", "16", "--batch", "2",
                 "--runs", "4", "--warmup", "1", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    by_hand = _bert_by_hand(2, 16, 4)[1], _bert_by_hand(2, 16, 2)[1]
    assert "speed-up: measured" in text and f"ideal {by_hand[0] / by_hand[1]:.3f}x" in text
    rep = json.loads(out.read_text())
    assert (rep["original"]["macs"], rep["pruned"]["macs"]) == by_hand
    assert rep["ideal_speedup"] == pytest.approx(by_hand[0] / by_hand[1])
    assert rep["pruned"]["file_bytes"] < rep["original"]["file_bytes"]
    assert rep["original"]["providers"][0] == "CPUExecutionProvider"
    assert rep["original"]["session_bytes"] > 0


def test_bench_takes_real_inputs_and_refuses_bad_ones(tmp_path, capsys):
    model = onnx.load(str(MODELS / "bert-ts.onnx"))
    feeds = synth_inputs(model, batch=1, seq=8)
    data = tmp_path / "in.npz"
    np.savez(data, **feeds)
    assert main(["bench", str(MODELS / "bert-ts.onnx"), str(MODELS / "bert-ts.onnx"), "--inputs", str(data),
                 "--runs", "2", "--warmup", "0", "--no-memory"]) == 0
    np.savez(data, input_ids=feeds["input_ids"])
    assert main(["bench", str(MODELS / "bert-ts.onnx"), str(MODELS / "bert-ts.onnx"), "--inputs", str(data),
                 "--runs", "2"]) == 2
    assert "no array for graph input(s) attention_mask" in capsys.readouterr().err


def test_bench_says_when_a_provider_is_missing(capsys):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    assert main(["bench", str(MODELS / "bert-ts.onnx"), str(MODELS / "bert-ts.onnx"), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider is not available" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def llama_genai_group(tmp_path_factory):
    """llama-genai (2 layers, 8 query heads on 2 KV heads of 16, fp32) with half its KV groups removed."""
    out = tmp_path_factory.mktemp("group") / "pruned"
    assert main([str(MODELS / "llama-genai"), "--ratio", "0.5", "--gqa", "group", "-o", f"{out}/"]) == 0
    return out


def test_bench_decodes_against_a_filled_cache_and_prices_it_by_bytes(llama_genai_group, tmp_path, capsys):
    """Decode steps at batch 3 against 40 cached tokens: the KV cache fed is 2 layers x K and V x KV heads x 16
    x 4 bytes per token and sequence, halved with the groups; a step reads the weights (the data file) once and
    the caches, so the ideal decode speed-up is that ratio of bytes per token."""
    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert main(["bench", str(MODELS / "llama-genai"), str(llama_genai_group), "--batch", "3", "--seq", "8",
                 "--decode", "6", "--context", "40", "--runs", "2", "--warmup", "1", "--no-memory",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    decode = rep["decode"]
    kv = [3 * 40 * 2 * 2 * heads * 16 * 4 for heads in (2, 1)]
    assert (decode["original"]["kv_bytes"], decode["pruned"]["kv_bytes"]) == tuple(kv)
    data = [(d / "model.onnx.data").stat().st_size for d in (MODELS / "llama-genai", llama_genai_group)]
    per_token = [(w + c) // 3 for w, c in zip(data, kv)]
    assert (decode["original"]["bytes_per_token"], decode["pruned"]["bytes_per_token"]) == tuple(per_token)
    assert decode["ideal_speedup"] == pytest.approx(per_token[0] / per_token[1])
    assert decode["speedup"] == pytest.approx(decode["original"]["median_ms"] / decode["pruned"]["median_ms"])
    assert decode["tokens_per_s"]["original"] == pytest.approx(3e3 / decode["original"]["median_ms"])
    assert rep["prompt_tokens_per_s"]["pruned"] == pytest.approx(3 * 8 * 1e3 / rep["pruned"]["median_ms"])
    assert "decode, 40 tokens cached per sequence, 6 steps each" in text and "decode speed-up: measured" in text


def test_bench_decodes_an_optimum_decoder_with_past(tmp_path, capsys):
    pruned = tmp_path / "p.onnx"
    assert main([str(MODELS / "optimum-llama-past.onnx"), "--ratio", "0.5", "--gqa", "group", "-o", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["bench", str(MODELS / "optimum-llama-past.onnx"), str(pruned), "--seq", "8", "--decode", "4",
                 "--context", "24", "--runs", "2", "--no-memory", "--json", str(tmp_path / "b.json")]) == 0
    decode = json.loads((tmp_path / "b.json").read_text())["decode"]
    assert decode["pruned"]["kv_bytes"] * 2 == decode["original"]["kv_bytes"] > 0


def test_decode_refuses_what_it_cannot_time_in_one_line(llama_genai_group, capsys):
    assert main(["bench", str(MODELS / "bert-ts.onnx"), str(MODELS / "bert-ts.onnx"), "--decode", "2"]) == 2
    err = capsys.readouterr().err
    assert "--decode needs models that take a KV cache" in err and len(err.strip().splitlines()) == 1
    # the tiny folder's rotary table holds 128 positions
    assert main(["bench", str(MODELS / "llama-genai"), str(llama_genai_group), "--decode", "2", "--context",
                 "4096", "--runs", "1", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "could not run a decode step at batch 1 with 4096 tokens cached (--context)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["bench", str(MODELS / "optimum-llama-past.onnx"), str(MODELS / "optimum-llama-past.onnx"),
                 "--genai", "--decode", "2", "--runs", "1"]) == 2
    assert "it needs --decode N and two GenAI folders" in capsys.readouterr().err


def test_bench_decodes_through_the_genai_generator(llama_genai_group, tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "bench.json"
    assert main(["bench", str(MODELS / "llama-genai"), str(llama_genai_group), "--batch", "2", "--seq", "8",
                 "--decode", "5", "--context", "30", "--runs", "2", "--no-memory", "--genai",
                 "--json", str(out)]) == 0
    g = json.loads(out.read_text())["genai"]
    assert (g["context"], g["steps"], g["batch"]) == (30, 5, 2)
    assert all(t > 0 for t in g["step_ms"] + g["prefill_s"])
    assert "generator decode speed-up: measured" in capsys.readouterr().out


def test_the_genai_generator_runs_on_the_threads_that_bench_runs_on(llama_genai_group, monkeypatch):
    """Left to its config, onnxruntime-genai 0.18 runs one intra-op thread (the 1B int4 decoder: 78 ms a step on 1
    of 2 cores, 41 ms on both), where ONNX Runtime's sessions take every core: each generator is told --threads,
    by default the cores this process may use."""
    og = pytest.importorskip("onnxruntime_genai")
    from onnxprune import bench
    seen = []

    class Seen(og.Config):
        def overlay(self, text):
            seen.append(json.loads(text)["model"]["decoder"]["session_options"]["intra_op_num_threads"])
            super().overlay(text)

    monkeypatch.setattr(og, "Config", Seen)
    folders = [MODELS / "llama-genai", llama_genai_group]
    r = bench.genai_decode(folders, batch=1, context=8, steps=3, warmup=1, threads=1)
    assert seen == [1, 1] and len(r.step_ms) == 2
    bench.genai_decode(folders, batch=1, context=8, steps=3, warmup=1)
    assert seen[2:] == [bench.usable_cores()] * 2


def test_benchmark_sessions_do_not_spin_so_that_one_cannot_slow_the_other():
    """Two sessions in one process with spinning thread pools took each other's cores: an identical copy of MiniLM
    made second measured 1.03x-1.10x "faster" (2026-12-07). Every session that times (bench, the speed target's
    variants) is made without spinning; a session made with ONNX Runtime's defaults spins."""
    import onnxruntime as ort
    from onnxprune import bench
    opts = bench.session_options(None)
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert opts.get_session_config_entry(key) == "0"
    with pytest.raises(Exception):         # the default: no entry, so spinning on
        ort.SessionOptions().get_session_config_entry("session.intra_op.allow_spinning")
    sess = bench.make_session(MODELS / "bert-ts.onnx", "cpu", None)
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
