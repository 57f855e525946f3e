"""A model folder built by ONNX Runtime GenAI's builder: GroupQueryAttention with a KV cache, external
data and genai_config.json. The pruned folder must load in onnxruntime-genai and generate exactly the
tokens that the masked original generates."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxprune import prune_model
from onnxprune.model.external import data_files
from onnxprune.model.save import save_model_atomic
from onnxprune.verify import masked_reference

og = pytest.importorskip("onnxruntime_genai")

from conftest import MODELS, genai_generate  # noqa: E402
SRC = MODELS / "llama-genai"                      # packed QKV
# packed and separate Q/K/V projections, and int4 (MatMulNBits with blocks of 32 rows: two heads of 16)
FOLDERS = ["llama-genai", "llama-genai-separate", "llama-genai-int4"]
PROMPT = [1, 5, 7, 9, 11]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True)


def generate(folder: Path, steps: int = 12) -> list[int]:
    return genai_generate(folder, PROMPT, steps)


def masked_folder(tmp_path: Path, src: Path, blocks, kept) -> Path:
    """The original folder with the dropped heads' output-projection rows zeroed (for a quantized model,
    their part of the projection's input)."""
    folder = tmp_path / "masked"
    shutil.copytree(src, folder)
    model = onnx.load(str(src / "model.onnx"))
    (folder / "model.onnx").unlink()
    (folder / "model.onnx.data").unlink()
    save_model_atomic(masked_reference(model, list(blocks), kept), folder / "model.onnx", external=True)
    return folder


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("gqa, heads, kv_heads", [("group", 4, 1), ("uniform", 4, 2)])
def test_pruned_folder_generates_what_the_masked_original_generates(tmp_path, folder, gqa, heads, kv_heads):
    SRC = MODELS / folder
    out = tmp_path / "pruned"
    out.mkdir()
    r = cli(SRC / "model.onnx", "--ratio", "0.5", "--gqa", gqa, "-o", f"{out}/", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in SRC.iterdir())
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (heads, kv_heads)
    pruned = onnx.load(str(out / "model.onnx"), load_external_data=False)
    cache = next(i for i in pruned.graph.input if i.name == "past_key_values.0.key")
    assert cache.type.tensor_type.shape.dim[1].dim_value == kv_heads
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gqa"] == gqa and report["kv_cache"] is True
    kept = {i: tuple(b["kept_heads"]) for i, b in enumerate(report["blocks"])}
    blocks = prune_model(onnx.load(str(SRC / "model.onnx")), kept=kept, verify=False).blocks
    expected = generate(masked_folder(tmp_path, SRC, blocks, kept))
    got = generate(out)
    assert got == expected
    assert len(got) == len(PROMPT) + 12
    # and the data file is fresh: exactly the bytes the pruned weights need, no appended leftovers
    weights = sum(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * int(onnx.numpy_helper.to_array(t).size)
                  for t in onnx.load(str(out / "model.onnx")).graph.initializer)
    size = (out / "model.onnx.data").stat().st_size
    assert size <= weights + 4096 * len(pruned.graph.initializer)
    assert cli(SRC / "model.onnx", "--ratio", "0.5", "--gqa", gqa, "-o", f"{out}/").returncode == 0
    again = data_files(out / "model.onnx", onnx.load(str(out / "model.onnx"), load_external_data=False))
    assert [f.name for f in again] == ["model.onnx.1.data"]        # a fresh name: never a mixed pair
    assert again[0].stat().st_size == size                         # written afresh, not appended to
    assert not (out / "model.onnx.data").exists()                  # the replaced model's data is gone


def test_a_plan_the_config_cannot_hold_is_refused(tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"0": [0, 1, 2, 3]}))       # block 0 loses a group, block 1 keeps all
    r = cli(SRC / "model.onnx", "--heads-to-prune", heads, "-o", f"{out}/")
    assert r.returncode == 4
    assert "genai" in r.stderr or "config" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_original_folder_generates(folder):
    assert len(generate(MODELS / folder)) == len(PROMPT) + 12


def _gemma_like_attention():
    """The attention of a GenAI Gemma 3 folder, by hand: a packed QKV cut by Split into Q [.., 1024] and
    K, V [.., 256], a q/k norm over the head size between Reshapes, and GroupQueryAttention with 4 query
    heads, 1 KV head and a sliding-window cache of 512 entries."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("Split", ["qkv", "sizes"], ["q0", "k0", "v"], axis=-1),
             helper.make_node("Reshape", ["q0", "per_head"], ["q1"]),
             helper.make_node("SimplifiedLayerNormalization", ["q1", "qn"], ["q2"]),
             helper.make_node("Reshape", ["q2", "back"], ["q"]),
             helper.make_node("GroupQueryAttention", ["q", "k0", "v", "past_key", "past_value", "seqlens",
                                                     "total"], ["y", "present_key", "present_value"],
                              domain="com.microsoft", num_heads=4, kv_num_heads=1, local_window_size=512,
                              sliding_window_cache=1),
             helper.make_node("MatMul", ["y", "wo"], ["out"])]
    inits = [numpy_helper.from_array(np.zeros((640, 1536), np.float32), "w"),
             numpy_helper.from_array(np.array([1024, 256, 256], np.int64), "sizes"),
             numpy_helper.from_array(np.array([0, -1, 256], np.int64), "per_head"),
             numpy_helper.from_array(np.array([0, -1, 1024], np.int64), "back"),
             numpy_helper.from_array(np.ones(256, np.float32), "qn"),
             numpy_helper.from_array(np.eye(1024, 640, dtype=np.float32), "wo")]
    cache = ["batch_size", 1, "past_sliding_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("x", f, ["batch_size", "sequence_length", 640]),
              helper.make_tensor_value_info("past_key", f, cache), helper.make_tensor_value_info("past_value", f, cache),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["batch_size"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", f, None)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_a_sliding_window_cache_and_a_normed_query_give_the_probe_its_sizes():
    """The cache's head size is the query width over num_heads, found through the q norm and the Split of
    the packed QKV (1024 / 4 = 256); a sliding-window cache gets its full local_window_size of entries,
    which ONNX Runtime demands; and no prompt row is padded, which such a cache does not take."""
    from onnxprune.inputs import _cache_hints, synth_inputs
    model = _gemma_like_attention()
    assert _cache_hints(model) == {"kv_cache_dim": 256, "past_sliding_length": 512,
                                   "input:past_key": 256, "input:past_value": 256}     # and per input
    feeds = synth_inputs(model)
    assert feeds["past_key"].shape == (2, 1, 512, 256)


def test_one_kv_head_of_group_query_attention_is_one_group():
    """kv_num_heads=1: K and V carry no head axis (every query head reads them), so only the op's attributes
    say that the four heads form one KV group; a plan then removes query heads one by one."""
    import numpy as np
    from onnxprune.inputs import synth_inputs
    model = _gemma_like_attention()
    feeds = synth_inputs(model)
    feeds["seqlens"], feeds["total"] = np.full(2, 4, np.int32), np.array(5, np.int32)
    result = prune_model(model, 0.25, feeds=feeds)
    block = result.blocks[0]
    assert (block.num_heads, block.num_kv_heads, block.kv_groups) == (4, 1, ((0, 1, 2, 3),))
    assert len(result.kept[0]) == 3 and result.max_error <= 1e-4


def test_a_present_cache_is_compared_on_its_filled_entries_only():
    """A sliding-window cache is a fixed buffer: entries past the mask's length are never written (they
    hold what memory held, NaN included), so verification compares the filled ones."""
    import numpy as np
    from onnxprune.verify import filled_cache, max_abs_diff
    a = np.zeros((1, 1, 8, 4), np.float32)
    b = a.copy()
    b[:, :, 5:] = np.nan
    feeds = {"attention_mask": np.ones((1, 5), np.int64)}
    assert max_abs_diff({"present.0.key": a}, {"present.0.key": b}) != 0
    assert max_abs_diff(filled_cache({"present.0.key": a}, feeds), filled_cache({"present.0.key": b}, feeds)) == 0
    b[:, :, 4] = 1.0           # a filled entry that differs still counts
    assert max_abs_diff(filled_cache({"present.0.key": a}, feeds), filled_cache({"present.0.key": b}, feeds)) == 1
