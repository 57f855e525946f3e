"""Optimum folders (``model.onnx`` beside the ``config.json`` that ``optimum-cli export onnx`` writes) pruned
with the folder form. Optimum's ORT classes make a decoder's empty KV cache from config.json: for Llama-like
types the head size is ``hidden_size // num_attention_heads`` (not ``head_dim``) and the KV heads
``num_key_value_heads``. The tests emulate that rule on the pruned graph's cache inputs, so a config that
optimum would mis-size fails here; ``tools/optimum_check.py`` runs optimum's own classes on such folders."""

import json
import shutil

import onnx
import pytest

from conftest import MODELS, cli

# what optimum-onnx 0.1 wrote for the exports in models/ (tools/export_optimum.py: hidden 64, 8 heads on 2 KV)
CONFIGS = {"llama": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                     "head_dim": 8, "vocab_size": 64},
           "gemma3": {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 8,
                      "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64}}


def _folder(tmp_path, name: str, suffix: str, config: dict):
    src = tmp_path / f"{name}-{suffix}"
    src.mkdir()
    shutil.copy(MODELS / f"optimum-{name}-{suffix}.onnx", src / "model.onnx")
    (src / "config.json").write_text(json.dumps(config))
    (src / "generation_config.json").write_text('{"do_sample": false}')
    return src


def _cache_dims(model_path) -> set[tuple[int, int]]:
    """(KV heads, head size) of every past input, as the graph declares them."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {tuple(i.type.tensor_type.shape.dim[a].dim_value for a in (1, 3))
            for i in model.graph.input if i.name.startswith("past_key_values")}


def _optimum_cache(cfg: dict) -> tuple[int, int]:
    """The (KV heads, head size) of the empty cache that optimum makes from ``cfg``."""
    head = cfg["head_dim"] if cfg["model_type"] in ("gemma", "gemma3_text") \
        else cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_key_value_heads"], head


@pytest.mark.parametrize("gqa, kv, heads", [("group", 1, 4), ("uniform", 2, 4)])
def test_a_pruned_llama_folder_with_past_is_sized_as_optimum_sizes_it(tmp_path, gqa, kv, heads):
    src = _folder(tmp_path, "llama", "past", CONFIGS["llama"])
    r = cli(src, "--ratio", "0.5", "--gqa", gqa, "-o", f"{tmp_path / 'out'}/")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert _cache_dims(tmp_path / "out" / "model.onnx") == {(kv, 8)} == {_optimum_cache(cfg)}
    # the query heads are the graph's; the config keeps hidden_size // head size and says the real counts
    assert cfg["num_attention_heads"] == 8 and cfg["num_key_value_heads"] == kv and cfg["head_dim"] == 8
    assert cfg["onnxprune"]["num_attention_heads"] == heads and cfg["onnxprune"]["num_key_value_heads"] == kv
    assert (tmp_path / "out" / "generation_config.json").read_text() == '{"do_sample": false}'


def test_without_a_cache_or_with_head_dim_read_the_config_gets_the_real_counts(tmp_path):
    src = _folder(tmp_path, "llama", "nopast", CONFIGS["llama"])
    assert cli(src, "--ratio", "0.5", "-o", f"{tmp_path / 'a'}/").returncode == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["num_attention_heads"] == 4 and "onnxprune" not in cfg          # nothing sizes a cache from it
    src = _folder(tmp_path, "gemma3", "past", CONFIGS["gemma3"])              # optimum reads its head_dim
    assert cli(src, "--ratio", "0.5", "-o", f"{tmp_path / 'b'}/").returncode == 0
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["num_attention_heads"] == 4 and "onnxprune" not in cfg
    assert _cache_dims(tmp_path / "b" / "model.onnx") == {_optimum_cache(cfg)}


def test_a_cache_that_optimum_cannot_size_is_refused_and_nothing_is_written(tmp_path):
    # a type whose KV heads optimum takes from num_attention_heads: a pruned cache has no config that fits
    config = dict(CONFIGS["llama"], model_type="gpt_neox")
    src = _folder(tmp_path, "llama", "past", config)
    r = cli(src, "--ratio", "0.5", "-o", f"{tmp_path / 'out'}/")
    assert r.returncode == 4
    assert "Optimum sizes the KV cache of a 'gpt_neox' model as 64 // num_attention_heads" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_encoder_folder_whose_layers_differ_keeps_its_fields_and_says_each_layers_counts(tmp_path):
    """A feature-extraction folder (no KV cache) cut by one circuit (K and V at other sizes) or pruned per layer:
    config.json's one-size fields cannot hold it and nothing sizes a cache from them, so they stay the
    original's and each layer's counts go under "onnxprune"; a uniform cut still updates them."""
    src = tmp_path / "bert"
    src.mkdir()
    shutil.copy(MODELS / "bert-ts.onnx", src / "model.onnx")
    config = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64}
    (src / "config.json").write_text(json.dumps(config))
    r = cli(src, "--v-dims", "0.5", "-o", f"{tmp_path / 'v'}/")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert {k: cfg[k] for k in config} == config and "head_dim" not in cfg
    assert cfg["onnxprune"]["layers"] == [{"num_attention_heads": 4, "num_key_value_heads": 4, "qk_head_dim": 8,
                                           "v_head_dim": 4}] * 2
    (tmp_path / "drop.json").write_text('{"0": [1], "1": [0, 2, 3]}')
    r = cli(src, "--heads-to-prune", tmp_path / "drop.json", "-o", f"{tmp_path / 'g'}/")
    assert r.returncode == 0, r.stderr
    layers = json.loads((tmp_path / "g" / "config.json").read_text())["onnxprune"]["layers"]
    assert [x["num_attention_heads"] for x in layers] == [3, 1]
    r = cli(src, "--ratio", "0.5", "-o", f"{tmp_path / 'u'}/")
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert r.returncode == 0 and cfg["num_attention_heads"] == 2 and "onnxprune" not in cfg


def test_a_decoder_folder_with_a_cache_whose_layers_differ_is_still_refused(tmp_path):
    src = _folder(tmp_path, "llama", "past", CONFIGS["llama"])
    r = cli(src, "--v-dims", "0.5", "-o", f"{tmp_path / 'out'}/")
    assert r.returncode == 4 and "the config files hold one head size" in r.stderr
    assert not (tmp_path / "out").exists()
