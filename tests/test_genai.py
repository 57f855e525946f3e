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
from onnxprune.io import data_files, save_model_atomic
from onnxprune.verify import masked_model

og = pytest.importorskip("onnxruntime_genai")

from conftest import MODELS  # noqa: E402
SRC = MODELS / "llama-genai"                      # packed QKV
FOLDERS = ["llama-genai", "llama-genai-separate"]  # packed, and separate Q/K/V projections
PROMPT = [1, 5, 7, 9, 11]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True)


def generate(folder: Path, steps: int = 12) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([PROMPT])
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


def masked_folder(tmp_path: Path, src: Path, blocks, kept) -> Path:
    """The original folder with the dropped heads' output-projection rows zeroed."""
    folder = tmp_path / "masked"
    shutil.copytree(src, folder)
    model = onnx.load(str(src / "model.onnx"))
    (folder / "model.onnx").unlink()
    (folder / "model.onnx.data").unlink()
    save_model_atomic(masked_model(model, list(blocks), kept), folder / "model.onnx", external=True)
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
