"""Pruning must equal masking, on every real export in models/, for every matcher family."""

import json
import zlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import prune_model
from onnxprune.api import inspect_model
from onnxprune.errors import PlanError
from onnxprune.inputs import synth_inputs
from onnxprune.verify import compare, masked_reference, max_abs_diff, run


from conftest import MODELS  # noqa: E402

MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())["models"]
SUPPORTED = sorted(n for n in MANIFEST if "refused" not in MANIFEST[n])
REFUSED = sorted(n for n in MANIFEST if "refused" in MANIFEST[n])     # refused on purpose, with a reason
# exports whose form another export of the same family already covers in the default run (pytest -m slow)
SLOW = {"llama-gqa4-ts-sdpa.onnx", "llama-gqa4-d18-sdpa.onnx"}
SUPPORTED_FAST = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SUPPORTED]
ATOL = 1e-4

# (H, H_kv) of every attention block in graph order, from the configs in tools/export_models.py.
_MHA2 = [(4, 4)] * 2
_GQA2 = [(8, 2)] * 2
EXPECTED_BLOCKS = {
    "BERT": _MHA2, "RoBERTa": _MHA2, "DistilBERT": _MHA2, "ViT": _MHA2, "CLIP vision": _MHA2, "GPT-2": _MHA2,
    "GPT-NeoX": _MHA2, "Bloom": _MHA2, "T5 encoder": _MHA2, "MiniLM": [(6, 6)] * 2,
    "Swin": [(2, 2), (2, 2), (4, 4)],                 # depths [2, 1], heads [2, 4]
    "Falcon": [(4, 1)] * 2,                          # multi-query: one KV head
    "Phi-3": _GQA2, "Llama": _GQA2, "Qwen2": _GQA2, "Mistral": _GQA2,
    "Llama, 4 KV groups": [(16, 4)] * 2,             # 16 heads of 4, 4 KV heads: groups of 4 query heads
    "Llama, GenAI heads of 32": [(4, 2)] * 2,        # the GenAI folder that a cut inside the heads can halve
    "Gemma 3, multi-query": [(4, 1)] * 2,            # like Gemma 3 270M: one KV head, copied by repeat_kv
    "Qwen3": _GQA2, "Gemma 3": _GQA2,                # q/k RMSNorm over the head size (ReduceMean) inside
    "StableLM": _GQA2,                               # a LayerNorm per head: Split, H x LayerNorm, Concat
    "Cohere": _GQA2,                                 # q/k LayerNorm with a per-head weight [H, D], sliced
    "CodeGen": [(8, 8)] * 2,                         # q, v, k packed per 4 shards: a 4 x 2 grid of heads
    "Phi": _MHA2,                                    # rotary on half of each head
    "GPT-J": _MHA2,                                  # interleaved rotary: x[..., ::2], x[..., 1::2]
    "DeBERTa-v2": _MHA2,                             # c2p/p2c scores by GatherElements on [B*H, S, 2k]
    "SigLIP vision": [(4, 4)] * 3,                   # 2 encoder blocks + nn.MultiheadAttention pooling, 3-D
    "BEiT": _MHA2,                                   # a relative position bias table per block
    "ALBERT": _MHA2,                                 # one layer's weights shared by both blocks
    "BERT, fixed shapes": _MHA2,                     # mask fixed at [2, 7] with dynamic ids; all fixed
    "BERT, a 4-row language table": _MHA2,           # lang_ids index 4 rows: synthetic ids must stay below
    "Llama, Optimum": _GQA2, "Qwen3, Optimum": _GQA2, "Gemma 3, Optimum": _GQA2,  # optimum's text-generation(-with-past) exports
    "BART": [(4, 4)] * 6, "Whisper": [(4, 4)] * 6,   # 2 encoder self, 2 x (decoder self + cross)
    "T5": [(4, 4)] * 6,                              # the same; cross-attention's position bias: zeros
    # ORT's Whisper exporter: cross 0, self 1, cross 1; self 0 is an expected miss (see the manifest)
    "Whisper decoder, ORT-exported": [(4, 4)] * 3,
    "PyTorch nn.TransformerEncoder": _MHA2, "SDPA, scale from the runtime head size": _MHA2,
    "GPT-2, ORT-exported": _MHA2,                    # KV cache past_i [2, B, H, P, D] in, present_i out
    "ONNX Attention, 3-D": _GQA2,                    # torch.onnx.ops.attention: q_num_heads 8, kv_num_heads 2
    # onnxruntime's quantizers (tools/quantize_models.py): BERT 4 heads of 64, Llama 8 heads of 32 on 4 KV
    "BERT, quantized": [(4, 4)] * 2, "Llama, quantized": [(8, 4)] * 2,
    # int8 -> Cast -> Mul by a scale, written by hand (tools/edit_models.py) over bert-ts and llama-ts
    "BERT, int8 by Cast and Mul": _MHA2, "Llama, int8 by Cast and Mul": _GQA2,
    "ALBERT, quantized": _MHA2,                      # quantize_dynamic of one layer read by both blocks
    # saved by ONNX Runtime after its CPU optimizations: FusedMatMul scores, a Split of the shape vector
    "BERT, saved by ONNX Runtime's CPU optimizer": _MHA2, "Llama, saved by ONNX Runtime's CPU optimizer": _GQA2,
}


def _load(name):
    return onnx.load(str(MODELS / name))


def _strict(model):
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(inferred, full_check=True)


def _check_strict(model, original):
    """Strict shape inference and the full checker. The GenAI builder's graph fails even the plain checker
    from the start (ORT contrib ops in the default domain, unknown to onnx); then the pruned model may fail
    the strict checks only for that same reason. An unchanged model (nothing pruned) is the input itself."""
    if model is original or model.SerializeToString() == original.SerializeToString():
        return
    try:
        _strict(original)
    except Exception:
        with pytest.raises(Exception) as plain:
            onnx.checker.check_model(original)
        reason = str(plain.value).splitlines()[0]
        assert reason.startswith("No Op registered for"), reason
        with pytest.raises(Exception) as info:
            _strict(model)
        assert str(info.value).splitlines()[0] == reason
        return
    _strict(model)


def _shares_weights(model):
    inits = {i.name for i in model.graph.initializer}
    return any(n.op_type == "Identity" and n.input[0] in inits for n in model.graph.node)


def _random_keep(block, rng):
    """A random keep set that every layout accepts: the same count in every KV group, a rectangle of a grid
    of heads (CodeGen)."""
    from onnxprune.plan import head_grid
    rows = head_grid(block)
    if rows is not None:
        rs = rng.choice(len(rows), size=int(rng.integers(1, len(rows) + 1)), replace=False)
        cs = rng.choice(len(rows[0]), size=int(rng.integers(1, len(rows[0]) + 1)), replace=False)
        return tuple(sorted(rows[r][c] for r in rs for c in cs))
    groups = block.kv_groups
    per = int(rng.integers(1, len(groups[0]) + 1)) if len(groups) < block.num_heads else None
    if per is None:
        k = int(rng.integers(1, block.num_heads))
        return tuple(sorted(rng.choice(block.num_heads, size=k, replace=False).tolist()))
    if len(groups) == 1:
        per = int(rng.integers(1, block.num_heads))
    return tuple(sorted(h for g in groups for h in rng.choice(g, size=per, replace=False).tolist()))


def test_every_family_has_a_supported_export():
    families = {v["family"] for v in MANIFEST.values() if "refused" not in v}
    supported = {MANIFEST[n]["family"] for n in SUPPORTED}
    assert families - supported == set()


@pytest.mark.parametrize("name", SUPPORTED)
def test_matcher_finds_every_block(name):
    result = inspect_model(_load(name))
    assert [(b.num_heads, b.num_kv_heads) for b in result.blocks] == EXPECTED_BLOCKS[MANIFEST[name]["family"]]
    assert len(result.misses) == MANIFEST[name].get("expected_misses", 0), result.misses


@pytest.mark.parametrize("name", SUPPORTED_FAST)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pruning_equals_masking(name, ratio):
    model = _load(name)
    result = prune_model(model, ratio)
    assert result.max_error is not None and result.max_error <= ATOL, result.max_error
    _check_strict(result.model, model)
    if not _shares_weights(model):  # (blocks that share weights through Identity keep them once)
        assert result.params_after < result.params_before
    for b in result.blocks:
        assert len(result.kept[b.index]) < b.num_heads or b.num_heads == 1


@pytest.mark.parametrize("name", SUPPORTED_FAST)
def test_pruned_model_holds_at_other_sizes(name):
    """Shapes the rewrite solved on the probe's batch and length must hold at any other batch and length."""
    model = _load(name)
    result = prune_model(model, 0.5)
    for batch, seq in [(1, 3), (3, 9)]:
        feeds = synth_inputs(model, seed=1, batch=batch, seq=seq)
        masked = masked_reference(model, list(result.blocks), result.kept)
        assert compare(masked, result.model, feeds, result.io_keep) <= ATOL, (batch, seq)


@pytest.mark.parametrize("name", SUPPORTED_FAST)
def test_the_proof_in_segments_agrees_with_the_whole_proof(name):
    """Both models of the proof run in segments of 4 KB of weights (most weights a segment alone; 256 MiB by
    default) give the whole proof's error, bit for bit, on every model."""
    from onnxprune.segments import segments
    model = _load(name)
    result = prune_model(model, 0.5, verify=False)
    masked = masked_reference(model, list(result.blocks), result.kept)
    feeds = synth_inputs(model, seed=2)
    whole = compare(masked, result.model, feeds, result.io_keep)
    assert len(segments(result.model, 4096)) >= 2
    assert compare(masked, result.model, feeds, result.io_keep, segment_bytes=4096) == whole <= ATOL


# where the proof block by block is not possible, and why (it then runs in segments, and says so): a quantized
# model's reference is its float view; a weight that blocks share is read by an Identity outside them, and a
# cut keeps it whole for the block that keeps most (ALBERT, the cloned encoder), or a constant outside the blocks
# is rewritten (Falcon's shared shape vector); ORT's fused BERT hands its Attention an int mask index that onnx
# cannot type
NOT_BLOCKWISE = {
    **{n: "quantized model" for n in SUPPORTED if "quantized" in MANIFEST[n] or "int4" in n},
    "albert-ts.onnx": "read outside the blocks, differs", "torch-encoder-cloned-ts.onnx": "outside the blocks, differs",
    "falcon-ts.onnx": "outside the blocks, differs", "bert-ort-attention.onnx": "EmbedLayerNormalization",
    "bert-ort-attention-fp16.onnx": "EmbedLayerNormalization", "bert-ort-mha.onnx": "EmbedLayerNormalization",
}


@pytest.mark.parametrize("name", SUPPORTED_FAST)
def test_the_proof_block_by_block_agrees_with_the_whole_proof(name):
    """``--proof blocks`` cuts each attention block out of both models and runs it alone: it passes wherever the
    whole proof passes, and each block's cut holds no weight of another block."""
    from onnxprune import blockproof
    model = _load(name)
    folder = str(MODELS / name.split("/")[0]) if "/" in name else None
    result = prune_model(model, 0.5, proof="blocks", external_dir=folder)
    whole = prune_model(model, 0.5, proof="whole", external_dir=folder)
    assert result.max_error <= ATOL and whole.max_error <= ATOL
    if name in NOT_BLOCKWISE:
        assert result.proof_run == "segments" and NOT_BLOCKWISE[name] in result.proof_note
        return
    assert result.proof_run == "blocks", result.proof_note
    weights = {t.name for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT}
    heavy = blockproof.weighty(model)
    for b in result.blocks:
        nodes, frontier = blockproof.cut_out(model, set(b.nodes), blockproof.block_outputs(model, b), heavy)
        assert frontier or b.index == result.blocks[0].index      # the first may start at the graph inputs
        read = {i for k in nodes for i in model.graph.node[k].input} & weights
        others = {p.weight for c in result.blocks if c.index != b.index for p in c.projections} - \
            {p.weight for p in b.projections}
        assert not read & others, (b.index, read & others)


@pytest.mark.parametrize("name", ["bert-ts.onnx", "llama-gqa4-ts.onnx", "gemma3-genai/model.onnx", "t5-ts.onnx"])
def test_a_planted_fault_fails_the_proof_block_by_block(name):
    """Planted faults: one block's output projection reads its kept heads' rows one head off, or a NaN in one of
    its weights: the proof block by block fails. A weight outside the blocks changed: the blocks alone cannot see
    it, so the comparison outside them sends the proof to segments, which fails."""
    from onnxprune import pipeline
    from onnxprune.errors import VerifyError
    model = _load(name)
    folder = MODELS / name.split("/")[0] if "/" in name else None
    result = prune_model(model, 0.5, verify=False, external_dir=folder)
    masked = masked_reference(model, list(result.blocks), result.kept, folder)
    block = result.blocks[-1]

    def proved(pruned):
        return pipeline.prove(masked, pruned, model, None, result.io_keep, folder, ATOL, result.blocks, "blocks",
                              pruned_dir=folder)
    error, run, _, _ = proved(result.model)
    assert run == "blocks" and error <= ATOL

    def planted(name, change):
        wrong = onnx.ModelProto()
        wrong.CopyFrom(result.model)
        t = next(t for t in wrong.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t, base_dir=str(folder or ""))), t.name))
        return wrong
    rows = len(result.kept[block.index])
    with pytest.raises(VerifyError):
        proved(planted(block.o_proj.weight, lambda a: np.roll(a, a.shape[0] // rows, axis=0)))
    with pytest.raises(VerifyError):
        proved(planted(block.projection("v").weight if block.projection("v") else block.o_proj.weight,
                       lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a).astype(a.dtype)))
    inside = {w for b in result.blocks for p in b.projections for w in (p.weight, p.bias)}
    outside = next(t.name for t in result.model.graph.initializer if t.name not in inside and len(t.dims) == 2
                   and t.data_type == onnx.TensorProto.FLOAT and t.dims[0] > 8)
    with pytest.raises(VerifyError):
        proved(planted(outside, lambda a: a * 1.5))


@pytest.mark.parametrize("name", ["bert-ts.onnx", "llama-gqa4-ts.onnx", "gemma3-genai/model.onnx"])
def test_a_wrong_slice_in_one_block_fails_the_proof_in_segments(name):
    """A planted fault: the last block's output projection reads its kept heads' rows one head off (the wrong
    slice of the original). Run in segments, the proof fails as the whole proof does."""
    model = _load(name)
    result = prune_model(model, 0.5, verify=False)
    block = result.blocks[-1]
    wrong = onnx.ModelProto()
    wrong.CopyFrom(result.model)
    folder = MODELS / name.split("/")[0] if "/" in name else None
    weight = next(t for t in wrong.graph.initializer if t.name == block.o_proj.weight)
    arr = numpy_helper.to_array(weight, base_dir=str(folder or ""))
    axis = next(t.axes[0] for t in block.tensors if t.name == block.o_proj.weight) if any(
        t.name == block.o_proj.weight for t in block.tensors) else 0
    weight.CopyFrom(numpy_helper.from_array(np.roll(arr, arr.shape[axis] // len(result.kept[block.index]),
                                                    axis=axis), weight.name))
    masked = masked_reference(model, list(result.blocks), result.kept, folder)
    feeds = synth_inputs(model, seed=2)
    right = compare(masked, result.model, feeds, result.io_keep, folder, folder, segment_bytes=4096)
    assert right <= ATOL
    bad = compare(masked, wrong, feeds, result.io_keep, folder, folder, segment_bytes=4096)
    assert bad > 1e-2 and bad == compare(masked, wrong, feeds, result.io_keep, folder, folder)


@pytest.mark.parametrize("name", SUPPORTED_FAST)
def test_random_keep_sets(name):
    model = _load(name)
    blocks = inspect_model(model).blocks
    rng = np.random.default_rng(zlib.crc32(name.encode()))   # the same sets in every run
    feeds = synth_inputs(model)
    for _ in range(2):
        kept = {b.index: _random_keep(b, rng) for b in blocks}
        if MANIFEST[name]["family"] == "ALBERT, quantized":     # one int8 weight read by both: cut once for both
            kept = dict.fromkeys(kept, kept[blocks[0].index])
        result = prune_model(model, kept=kept, feeds=feeds)
        assert result.max_error <= ATOL, (kept, result.max_error)
        _check_strict(result.model, model)


@pytest.mark.parametrize("name", ["bert-ts.onnx", "gpt2-d18.onnx", "llama-d18.onnx", "t5-encoder-d18.onnx",
                                  "bert-qdq.onnx", "bert-dyn.onnx", "llama-qdq-pc.onnx", "llama-nbits32.onnx"])
def test_masking_the_wrong_heads_is_detected(name):
    """The check can fail: masking other heads than the pruned ones gives a large difference (quantized
    models too, whose reference zeroes the dropped heads' part of the projection's input)."""
    model = _load(name)
    feeds = synth_inputs(model)
    result = prune_model(model, 0.5, feeds=feeds, verify=False)
    wrong = {}
    for b in result.blocks:
        keep = set(result.kept[b.index])
        dropped = [h for h in range(b.num_heads) if h not in keep]
        wrong[b.index] = tuple(sorted((keep - {min(keep)}) | {dropped[0]}))
    reference = run(masked_reference(model, list(result.blocks), wrong), feeds)
    assert max_abs_diff(reference, run(result.model, feeds)) > 1e-2


@pytest.mark.parametrize("name", ["bert-ts.onnx", "llama-d18.onnx"])
def test_ratio_zero_is_identity(name):
    model = _load(name)
    result = prune_model(model, 0.0)
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.max_error == 0.0


@pytest.mark.parametrize("name", ["bert-ts.onnx", "gpt2-d18.onnx", "swin-ts.onnx"])
def test_untouched_initializers_keep_their_bytes(name):
    model = _load(name)
    result = prune_model(model, 0.5)
    sliced = {t.name for b in result.blocks for t in b.tensors if t.constant}
    before = {i.name: i for i in model.graph.initializer}
    after = {i.name: i for i in result.model.graph.initializer}
    untouched = [n for n in before if n not in sliced and n in after]
    assert len(untouched) > 10
    for n in untouched:
        assert numpy_helper.to_array(after[n]).tobytes() == numpy_helper.to_array(before[n]).tobytes(), n
        assert after[n].data_type == before[n].data_type


@pytest.mark.parametrize("keep_groups", [(0,), (1,)])
def test_onnx_attention_3d_loses_whole_kv_groups(keep_groups):
    """torch.onnx's 3-D Attention op: removing a KV group narrows K and V and updates both head counts."""
    model = _load("onnx-attention-3d-d23.onnx")
    blocks = inspect_model(model).blocks
    kept = {b.index: tuple(h for g in keep_groups for h in b.kv_groups[g]) for b in blocks}
    result = prune_model(model, kept=kept, gqa="group")
    assert result.max_error <= ATOL
    _check_strict(result.model, model)
    heads = [{a.name: a.i for a in n.attribute} for n in result.model.graph.node if n.op_type == "Attention"]
    assert heads == [{"is_causal": 1, "q_num_heads": 4, "kv_num_heads": 1}] * 2


# grouped-query exports: more than one KV head, fewer than the query heads
GROUPED = [n for n in SUPPORTED if 1 < EXPECTED_BLOCKS[MANIFEST[n]["family"]][0][1]
           < EXPECTED_BLOCKS[MANIFEST[n]["family"]][0][0]]
FOUR_GROUPS = [n for n in SUPPORTED if MANIFEST[n]["family"] == "Llama, 4 KV groups"]


@pytest.mark.parametrize("name", [n if n == "llama-gqa4-ts.onnx" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FOUR_GROUPS])
def test_whole_kv_groups_go_in_any_combination(name):
    """--gqa group on a torch export with 4 KV groups: kept groups contiguous or not, 1 to 3 of them, prune
    exactly; the K and V projections keep just the kept groups' columns. (With 2 groups, one
    kept group is always contiguous: that hid a bug that 2 of 4 shows.)"""
    model = _load(name)
    blocks = inspect_model(model).blocks
    feeds = synth_inputs(model)
    for groups in [(3,), (0, 2), (1, 3), (0, 3), (1, 2), (0, 1, 3), (0, 2, 3)]:
        kept = {b.index: tuple(h for g in groups for h in b.kv_groups[g]) for b in blocks}
        result = prune_model(model, kept=kept, gqa="group", feeds=feeds)
        assert result.max_error <= ATOL, (groups, result.max_error)
        for b in result.blocks:
            assert b.kept_kv_heads(result.kept[b.index]) == list(groups)
            k = b.projection("k")
            old = next(i for i in model.graph.initializer if i.name == k.weight)
            new = next(i for i in result.model.graph.initializer if i.name == k.weight)
            assert new.dims[k.head_axis] == old.dims[k.head_axis] * len(groups) // 4, (groups, k.weight)
    _check_strict(result.model, model)


@pytest.mark.parametrize("name, ratio", [(n, 0.5) for n in GROUPED] + [(n, r) for n in FOUR_GROUPS for r in (0.25, 0.75)])
def test_gqa_group_mode_by_ratio(name, ratio):
    """A ratio in group mode removes the lowest-scoring whole KV groups of every grouped-query export."""
    model = _load(name)
    result = prune_model(model, ratio, gqa="group")
    assert result.max_error <= ATOL and result.gqa == "group"
    for b in result.blocks:
        kv = b.kept_kv_heads(result.kept[b.index])
        assert len(result.kept[b.index]) == len(kv) * (b.num_heads // b.num_kv_heads)
    _check_strict(result.model, model)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_exports_say_why(name):
    """OLMo-2 normalises q and k over all heads at once (an RMSNorm over H*D): pruning would change that
    statistic, so no pruned model could equal the masked original. The block is refused, with the node."""
    from onnxprune.errors import MatchError
    model = _load(name)
    if MANIFEST[name].get("quantized"):       # QLinearMatMul and kin: the whole model is refused, with the way out
        for run_it in (inspect_model, lambda m: prune_model(m, 0.5)):
            with pytest.raises(MatchError, match=f"{MANIFEST[name]['refused']}.*prune the float model, then quantize"):
                run_it(model)
        return
    result = inspect_model(model)
    assert result.blocks == () and result.misses
    assert all(MANIFEST[name]["refused"] in m.reason for m in result.misses), result.misses
    with pytest.raises(MatchError, match=MANIFEST[name]["refused"]):
        prune_model(model, 0.5)


@pytest.mark.parametrize("name", [n for n in SUPPORTED if MANIFEST[n]["family"] == "ALBERT"])
def test_blocks_that_share_weights_share_their_slice(name):
    """ALBERT runs one layer's weights in every block: the blocks keep the same heads, and the model loses
    the dropped heads' parameters once (hidden 32, 4 heads of 8, ratio 0.5: Q, K, V lose 16 columns and 16
    bias entries each, O loses 16 rows: 3 x (32 x 16 + 16) + 16 x 32 = 2096)."""
    model = _load(name)
    # scores that disagree between the blocks: both keep the best heads of their mean (normalised) scores
    given = {0: [4.0, 3.0, 1.0, 0.0], 1: [0.0, 1.0, 3.5, 4.0]}
    assert prune_model(model, 0.5, importance=given).kept == {0: (0, 2), 1: (0, 2)}
    for ratio, removed in ((0.5, 2096), (0.75, 3 * (32 * 24 + 24) + 24 * 32)):
        result = prune_model(model, ratio)
        assert result.max_error <= ATOL
        assert len({result.kept[b.index] for b in result.blocks}) == 1
        assert result.params_before - result.params_after == removed
        _check_strict(result.model, model)


@pytest.mark.parametrize("name", [n for n in SUPPORTED if MANIFEST[n]["family"] == "ALBERT"])
def test_blocks_that_share_weights_and_keep_different_heads_never_grow_the_model(name):
    """Heads given by hand may differ between blocks that share one layer. The shared weights are stored once,
    cut to the heads that any block keeps, and a block that keeps fewer reads a Gather of them: a block that
    keeps every head keeps them whole (before, the other block got a sliced copy: the model grew by it), and
    two blocks that keep heads {1} and {2} keep the weights of those two (2096 parameters fewer, as ratio 0.5)."""
    model = _load(name)
    for kept, removed in (({0: [0, 1, 2, 3], 1: [0, 1]}, 0), ({0: [0, 1, 2], 1: [1, 3]}, 0),
                          ({0: [1], 1: [2]}, 2096), ({0: [0, 1], 1: [0, 1]}, 2096)):
        result = prune_model(model, kept=kept)
        assert result.max_error <= ATOL, kept
        assert result.params_before - result.params_after == removed, kept
        _check_strict(result.model, model)
        gathers = [n for n in result.model.graph.node if n.op_type == "Gather" and "__gather" in n.name]
        assert bool(gathers) == (kept[0] != kept[1]), kept


@pytest.mark.parametrize("name", [n for n in SUPPORTED if MANIFEST[n]["family"] == "Gemma 3, multi-query"])
def test_one_kv_head_copied_by_repeat_kv_is_multi_query(name):
    """With one KV head, K and V carry no head axis, so only repeat_kv's Expand tells that it serves all four
    query heads: one KV group, query heads removed one by one (also under --gqa group, which cannot remove
    the only group), and the report's KV cache per token unchanged. A GQA model's group removal halves it."""
    from onnxprune.report import build_report, format_table
    model = _load(name)
    assert [(b.num_kv_heads, b.kv_groups) for b in inspect_model(model).blocks] == [(1, ((0, 1, 2, 3),))] * 2
    result = prune_model(model, 0.5, gqa="group")
    assert result.max_error <= ATOL and all(len(k) == 2 for k in result.kept.values())
    report = build_report(result, name, None, 0.5)
    per_token = 2 * 2 * result.blocks[0].head_dim * 4         # K and V of 2 layers, fp32
    assert report["kv_cache_bytes_per_token"] == {"before": per_token, "after": per_token}
    assert "--gqa group does not apply" in format_table(report)
    gqa = prune_model(_load("llama-gqa4-ts.onnx"), 0.5, gqa="group")
    kv = build_report(gqa, "llama", None, 0.5)["kv_cache_bytes_per_token"]
    assert kv["after"] * 2 == kv["before"]


@pytest.mark.parametrize("name", [n for n in SUPPORTED if MANIFEST[n]["family"] == "ALBERT"])
def test_shared_blocks_are_calibrated_one_by_one(name):
    """Calibrated importance masks each block's heads through a copy of the shared output projection of its
    own: removing a head in block 0 does not change it in block 1, so the two blocks' ablation scores differ,
    then the plan ties them. One refit cannot serve two blocks: --compensate says so."""
    from onnxprune.importance import calibrated_scores
    from onnxprune.calibration.session import Calibrator
    from onnxprune.calibration.data import batches
    model = _load(name)
    feeds = synth_inputs(model, batch=4)
    cal = Calibrator(model, inspect_model(model).blocks, batches(feeds), progress=False)
    scores = calibrated_scores(cal, "ablation")
    assert cal.shared == {1} and not np.allclose(scores[0], scores[1])
    result = prune_model(model, 0.5, importance="ablation", calib=feeds)
    assert result.max_error <= ATOL and result.params_before - result.params_after == 2096
    with pytest.raises(PlanError, match="shares its output projection"):
        prune_model(model, 0.5, calib=feeds, compensate="refit")


@pytest.mark.parametrize("name", [n for n in SUPPORTED if MANIFEST[n].get("exporter") == "optimum"
                                  and MANIFEST[n].get("kv_cache")])
def test_optimum_kv_caches_shrink_with_whole_groups(name):
    """Optimum's decoders with a KV cache: group mode is the default there, the past inputs and present
    outputs are re-declared with the kept KV heads, and pruned == masked holds on a decode step too."""
    model = _load(name)
    result = prune_model(model, 0.5)
    assert result.gqa == "group" and result.kv_cache and result.max_error <= ATOL
    kept_kv = len(result.blocks[0].kept_kv_heads(result.kept[0]))
    assert kept_kv == 1
    caches = [v for v in list(result.model.graph.input) + list(result.model.graph.output)
              if v.name.startswith(("past_key_values.", "present."))]
    assert len(caches) == 8 and all(v.type.tensor_type.shape.dim[1].dim_value == kept_kv for v in caches)
    _check_strict(result.model, model)
