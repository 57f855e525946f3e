"""The runtime's config files beside a model: ORT GenAI's ``genai_config.json`` and a Hugging Face
``config.json``. They hold one head count for every layer, so a pruned model folder needs them updated,
and a plan whose layers differ in head count cannot be expressed in them.

A pruned folder is written when the output is a folder (``-o DIR/``): the model, its external data, the
updated configs, and a copy of every other file of the input's folder (tokenizer and the like).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError, PlanError
from .files import StagedFile
from .model.save import ours

GENAI = "genai_config.json"
HF = "config.json"


def model_in_folder(folder: Path) -> Path:
    """The model of a model folder given as MODEL: the decoder that ``genai_config.json`` names, else
    ``model.onnx``, else its only ``.onnx`` file; a folder with several and no config is refused, naming them."""
    folder = Path(folder)
    cfg = folder / GENAI
    if cfg.is_file():
        try:
            name = json.loads(cfg.read_text())["model"]["decoder"]["filename"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{cfg}: no model.decoder.filename in it") from None
        if not (folder / name).is_file():
            raise InputError(f"{cfg} names {name}, which is not in {folder}")
        return folder / name
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = sorted(folder.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{folder}: a folder with no .onnx model in it")
    raise InputError(f"{folder}: a folder of {len(found)} models ({', '.join(f.name for f in found[:6])}); "
                     "name the one to prune")


def configs_beside(model_path: Path) -> list[Path]:
    return [p for p in (model_path.parent / GENAI, model_path.parent / HF) if p.is_file()]


def head_counts(result) -> tuple[int, int, int]:
    """(query heads, KV heads, head size) kept in every block, or a PlanError when blocks differ."""
    counts = set()
    for b in result.blocks:
        kept = result.kept[b.index]
        ranks = {f.rank for f in getattr(result, "dim_fits", ()) if f.block == b.index}
        if len(ranks) > 1 or (ranks and len([f for f in result.dim_fits if f.block == b.index]) == 1):
            raise PlanError(f"the config files hold one head size, but block {b.index} keeps K and V at different "
                            "sizes (a cut inside its heads of one circuit, or of both at other ranks); write a "
                            "single model file (-o FILE.onnx) instead of a folder")
        counts.add((len(kept), len(b.kept_kv_heads(kept)), ranks.pop() if ranks else b.head_dim))
    if len(counts) != 1:
        per = ", ".join(f"{b.index}: {len(result.kept[b.index])}" for b in result.blocks)
        raise PlanError(f"the config files hold one head count for all layers, but this plan keeps different "
                        f"counts per block ({per}); prune every block alike (--ratio) or write a single model file "
                        f"(-o FILE.onnx) instead of a folder")
    return counts.pop()


def _original_counts(result) -> tuple[int, int]:
    b = result.blocks[0]
    return b.num_heads, b.num_kv_heads


def update_genai(cfg: dict, result, filename: str) -> dict:
    decoder = cfg.get("model", {}).get("decoder")
    if not isinstance(decoder, dict):
        raise InputError(f"{GENAI}: no model.decoder section")
    heads, kv, head_size = head_counts(result)
    before = _original_counts(result)
    found = (decoder.get("num_attention_heads"), decoder.get("num_key_value_heads"))
    if found != before:
        raise InputError(f"{GENAI} says {found[0]} query and {found[1]} KV heads, but the model has "
                         f"{before[0]} and {before[1]}: it does not describe this model")
    decoder.update(num_attention_heads=heads, num_key_value_heads=kv, head_size=head_size, filename=filename)
    return cfg


# Hugging Face Optimum's ORT classes make a decoder's empty KV cache from config.json: the KV head count from
# num_key_value_heads for these model types (else num_attention_heads), the head size from head_dim for
# these (else hidden_size // num_attention_heads). Read in optimum-onnx 0.1, onnxruntime/modeling_decoder.py.
OPTIMUM_HEAD_DIM = frozenset({"gemma", "gemma3_text", "gpt_oss", "nemotron"})
OPTIMUM_KV_HEADS = frozenset({"arcee", "deepseek_v3", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss",
                              "helium", "mistral", "llama", "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3",
                              "stablelm"})


def update_hf(cfg: dict, result) -> dict:
    """``config.json`` with the pruned counts: ``num_attention_heads``, ``num_key_value_heads`` and
    ``head_dim``, as transformers reads them. For a decoder with a KV cache whose model type Optimum sizes by
    ``hidden_size // num_attention_heads``, that quotient must stay the cache's head size, so
    ``num_attention_heads`` keeps it (ONNX Runtime takes the query heads from the graph, not the config) and
    the real counts go under ``"onnxprune"``; where Optimum takes the KV count from ``num_attention_heads``
    too, a pruned cache cannot be described and the folder is refused."""
    before = _original_counts(result)
    if cfg.get("num_attention_heads") not in (None, before[0]):
        raise InputError(f"{HF} says {cfg['num_attention_heads']} attention heads, but the model has "
                         f"{before[0]}: it does not describe this model")
    if not result.kv_cache:
        try:
            head_counts(result)
        except PlanError:            # nothing sizes a cache from it: the counts of each layer go beside it
            return _per_layer(cfg, result)
    heads, kv, head_size = head_counts(result)
    if "num_attention_heads" in cfg:
        cfg["num_attention_heads"] = heads
    if "num_key_value_heads" in cfg:
        cfg["num_key_value_heads"] = kv
    cfg["head_dim"] = head_size     # no longer hidden_size / num_attention_heads
    kind, hidden = cfg.get("model_type"), cfg.get("hidden_size")
    if result.kv_cache and kind not in OPTIMUM_HEAD_DIM and isinstance(hidden, int) \
            and "num_attention_heads" in cfg and hidden // heads != head_size:
        if kind not in OPTIMUM_KV_HEADS or hidden % head_size:
            raise PlanError(f"{HF}: Optimum sizes the KV cache of a {kind!r} model as {hidden} // "
                            f"num_attention_heads per head, which {heads} heads of {head_size} cannot give; write "
                            "a single model file (-o FILE.onnx) instead of a folder")
        cfg["num_attention_heads"] = hidden // head_size
        cfg["onnxprune"] = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_size,
                            "note": "num_attention_heads is hidden_size // head_dim, the KV cache's head size as "
                                    "Optimum computes it; the model itself has the counts given here"}
    return cfg


def layer_counts(result) -> list[dict]:
    """Each block's kept query and KV heads and its Q/K and V head sizes."""
    out = []
    for b in result.blocks:
        kept = result.kept[b.index]
        ranks = {f.circuit: f.rank for f in getattr(result, "dim_fits", ()) if f.block == b.index}
        out.append({"num_attention_heads": len(kept), "num_key_value_heads": len(b.kept_kv_heads(kept)),
                    "qk_head_dim": ranks.get("qk", b.head_dim), "v_head_dim": ranks.get("ov", b.head_dim)})
    return out


def _per_layer(cfg: dict, result) -> dict:
    """``config.json`` of a model without a KV cache whose blocks differ (the budget, --scope global, a cut of
    one circuit): its one-size fields stay the original's, as nothing in ONNX Runtime or Optimum reads them for
    such a model (the graph holds the sizes), and each layer's counts go under ``"onnxprune"``."""
    cfg["onnxprune"] = {"layers": layer_counts(result),
                        "note": "the layers differ in heads or head sizes, which this file's single fields cannot "
                                "hold; they keep the original's, and the model itself has the counts given here"}
    return cfg


def plan_folder(model_path: Path, out: Path, result, data: list[Path] = ()) -> list[tuple[Path, bytes | Path]]:
    """What a pruned folder at ``out.parent`` gets besides the model: (destination, new bytes or a file to
    copy). Empty when the output stays in the input's folder. The input's data files (``data``) and files
    named like the output's data file are not copied. Raises, before anything is written, when a config
    file does not describe the model or cannot express the plan."""
    if out.parent.resolve() == model_path.parent.resolve():
        return []
    skip = {model_path.name, model_path.name + ".data", out.name} | {Path(d).name for d in data}
    files = []
    for src in sorted(model_path.parent.iterdir()):
        if not src.is_file() or src.name in skip or ours(out, src.name) or ours(model_path, src.name) \
                or src.suffix == ".onnx" or src.name.startswith("."):
            continue
        dst = out.parent / src.name
        if src.name == GENAI:
            files.append((dst, json.dumps(update_genai(json.loads(src.read_text()), result, out.name),
                                          indent=4).encode()))
        elif src.name == HF:
            files.append((dst, json.dumps(update_hf(json.loads(src.read_text()), result), indent=2).encode()))
        else:
            files.append((dst, src))
    return files


def stage_folder(files: list[tuple[Path, bytes | Path]]) -> list[StagedFile]:
    """Each file of ``plan_folder`` written beside its destination; ``publish()`` each to put it in place."""
    staged = []
    try:
        for dst, content in files:
            staged.append(StagedFile(dst, content))
    except BaseException:
        for f in staged:
            f.discard()
        raise
    return staged
