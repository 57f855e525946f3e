"""Regenerate the small real exports in ``models/``.

Every model is a Hugging Face transformers class with a tiny config and random weights (biases too, so
that a bias that is sliced wrongly shows up as a numerical error), exported by ``torch.onnx.export``:

* ``ts``   TorchScript exporter (``dynamo=False``), opset 17;
* ``d18``  dynamo exporter, opset 18 (scaled-dot-product attention decomposed into MatMul/Softmax);
* ``d23``  dynamo exporter, opset 23 (SDPA becomes the ONNX ``Attention`` op).

Needs the ``tools`` extra (torch, transformers, onnxscript); the library and the tests do not.

    python tools/export_models.py                 # all models
    python tools/export_models.py --only bert     # names that contain "bert"
    python tools/export_models.py --list

``models/MANIFEST.json`` records, for each file, the versions used and the command that made it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from manifest import record  # noqa: E402  (tools/ is on the path when a tool runs)

MODELS = Path(__file__).resolve().parent.parent / "models"
SEED = 0


@dataclass(frozen=True)
class Spec:
    name: str                 # file stem in models/
    family: str               # family name used in the README table
    build: Callable[[], object]   # returns the torch module (random weights)
    inputs: Callable[[], dict]    # example inputs, by graph input name
    exporter: str             # ts | d18 | d23
    attn: str = "eager"       # eager | sdpa
    outputs: tuple[str, ...] = ("last_hidden_state",)
    dynamic: dict = field(default_factory=dict)   # input name -> {axis: name}
    refused: str | None = None   # onnxprune refuses this model on purpose: words of the reason it gives


def _text_inputs(vocab: int = 64, seq: int = 7, batch: int = 2, type_ids: bool = False):
    import torch

    def make():
        g = torch.Generator().manual_seed(SEED)
        feeds = {
            "input_ids": torch.randint(1, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
        }
        feeds["attention_mask"][1, -2:] = 0   # one padded row, so masks are really used
        if type_ids:
            feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
        return feeds
    return make


def _pixel_inputs(size: int, channels: int = 3, batch: int = 2):
    import torch

    def make():
        g = torch.Generator().manual_seed(SEED)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}
    return make


TEXT_DYN = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "token_type_ids": {0: "batch", 1: "sequence"}}
PIXEL_DYN = {"pixel_values": {0: "batch"}}


def _randomize(model):
    """Give every parameter a random value, biases included, so that no slice can hide behind a zero."""
    import torch
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _hf(cls_name: str, config_name: str, attn: str, **config):
    def build():
        import transformers
        cfg = getattr(transformers, config_name)(**config)
        cfg._attn_implementation = attn
        model = getattr(transformers, cls_name)(cfg)
        model.set_attn_implementation(attn)
        return _randomize(model)
    return build


def _specs() -> list[Spec]:
    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
    bert_cfg = dict(vocab_size=64, max_position_embeddings=64, type_vocab_size=2, **small)
    specs: list[Spec] = []

    def add(name, family, cls, cfgcls, inputs, dyn, exporters=("ts", "d18"), attns=("eager",), refused=None,
            outputs=("last_hidden_state",), **cfg):
        for ex in exporters:
            for attn in attns:
                suffix = f"{ex}" + ("" if attn == "eager" else f"-{attn}")
                specs.append(Spec(f"{name}-{suffix}", family, _hf(cls, cfgcls, attn, **cfg), inputs, ex, attn,
                                  outputs=outputs, dynamic=dyn, refused=refused))

    add("bert", "BERT", "BertModel", "BertConfig", _text_inputs(type_ids=True), TEXT_DYN,
        exporters=("ts", "d18"), attns=("eager", "sdpa"), **bert_cfg)
    specs.append(Spec("bert-d23-sdpa", "BERT", _hf("BertModel", "BertConfig", "sdpa", **bert_cfg),
                      _text_inputs(type_ids=True), "d23", "sdpa", dynamic=TEXT_DYN))
    # fixed shapes: the mask fixed at [2, 7] while the ids stay dynamic, and a fully static export
    partly = {k: v for k, v in TEXT_DYN.items() if k != "attention_mask"}
    add("bert-fixed-mask", "BERT, fixed shapes", "BertModel", "BertConfig", _text_inputs(type_ids=True), partly,
        exporters=("ts",), **bert_cfg)
    add("bert-static", "BERT, fixed shapes", "BertModel", "BertConfig", _text_inputs(type_ids=True), {},
        exporters=("ts",), **bert_cfg)
    add("roberta", "RoBERTa", "RobertaModel", "RobertaConfig", _text_inputs(), TEXT_DYN,
        vocab_size=64, max_position_embeddings=64, pad_token_id=1, type_vocab_size=1, **small)
    # MiniLM is the BERT architecture at 384 wide and 12 heads of 32; this keeps 6 heads of 8.
    add("minilm", "MiniLM", "BertModel", "BertConfig", _text_inputs(type_ids=True), TEXT_DYN,
        exporters=("ts",), attns=("sdpa",), vocab_size=64, max_position_embeddings=64, hidden_size=48,
        num_attention_heads=6, intermediate_size=96, num_hidden_layers=2)
    add("distilbert", "DistilBERT", "DistilBertModel", "DistilBertConfig", _text_inputs(), TEXT_DYN,
        vocab_size=64, max_position_embeddings=64, dim=32, n_heads=4, hidden_dim=64, n_layers=2)
    vit_cfg = dict(image_size=16, patch_size=8, num_channels=3, **small)
    add("vit", "ViT", "ViTModel", "ViTConfig", _pixel_inputs(16), PIXEL_DYN, **vit_cfg)
    add("clip-vision", "CLIP vision", "CLIPVisionModel", "CLIPVisionConfig", _pixel_inputs(16), PIXEL_DYN,
        image_size=16, patch_size=8, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        num_hidden_layers=2)
    add("swin", "Swin", "SwinModel", "SwinConfig", _pixel_inputs(32), PIXEL_DYN,
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4)
    dec = dict(vocab_size=64, use_cache=False)
    add("gpt2", "GPT-2", "GPT2Model", "GPT2Config", _text_inputs(), TEXT_DYN,
        n_embd=32, n_head=4, n_layer=2, n_positions=64, **dec)
    add("gpt-neox", "GPT-NeoX", "GPTNeoXModel", "GPTNeoXConfig", _text_inputs(), TEXT_DYN,
        max_position_embeddings=64, rotary_pct=0.5, **small, **dec)
    gqa = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=64,
               num_hidden_layers=2, max_position_embeddings=64, **dec)
    add("phi3", "Phi-3", "Phi3Model", "Phi3Config", _text_inputs(), TEXT_DYN, pad_token_id=0, **gqa)
    add("bloom", "Bloom", "BloomModel", "BloomConfig", _text_inputs(), TEXT_DYN,
        hidden_size=32, n_head=4, n_layer=2, **dec)
    add("falcon", "Falcon", "FalconModel", "FalconConfig", _text_inputs(), TEXT_DYN,
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, bias=True, alibi=False, **dec)
    add("t5-encoder", "T5 encoder", "T5EncoderModel", "T5Config", _text_inputs(), TEXT_DYN,
        vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16)
    add("llama", "Llama", "LlamaModel", "LlamaConfig", _text_inputs(), TEXT_DYN,
        exporters=("ts", "d18"), attns=("eager", "sdpa"), **gqa)
    specs.append(Spec("llama-d23-sdpa", "Llama", _hf("LlamaModel", "LlamaConfig", "sdpa", **gqa),
                      _text_inputs(), "d23", "sdpa", dynamic=TEXT_DYN))
    # four KV groups (16 heads of 4): two groups hid a bug that keeping 2 of 4 groups shows
    gqa4 = dict(gqa, hidden_size=64, num_attention_heads=16, num_key_value_heads=4, head_dim=4)
    add("llama-gqa4", "Llama, 4 KV groups", "LlamaModel", "LlamaConfig", _text_inputs(), TEXT_DYN,
        exporters=("ts", "d18"), attns=("eager", "sdpa"), **gqa4)
    specs.append(Spec("llama-gqa4-d23-sdpa", "Llama, 4 KV groups", _hf("LlamaModel", "LlamaConfig", "sdpa", **gqa4),
                      _text_inputs(), "d23", "sdpa", dynamic=TEXT_DYN))
    add("qwen2", "Qwen2", "Qwen2Model", "Qwen2Config", _text_inputs(), TEXT_DYN, **gqa)
    # q/k RMSNorm over the head size, inside the block
    add("qwen3", "Qwen3", "Qwen3Model", "Qwen3Config", _text_inputs(), TEXT_DYN, head_dim=8, **gqa)
    add("gemma3", "Gemma 3", "Gemma3TextModel", "Gemma3TextConfig", _text_inputs(), TEXT_DYN, head_dim=8,
        sliding_window=4, query_pre_attn_scalar=8, **gqa)
    # multi-query like Gemma 3 270M: 4 query heads share 1 KV head (repeat_kv of a single head)
    add("gemma3-mqa", "Gemma 3, multi-query", "Gemma3TextModel", "Gemma3TextConfig", _text_inputs(), TEXT_DYN,
        head_dim=8, sliding_window=4, query_pre_attn_scalar=8, **dict(gqa, num_attention_heads=4,
                                                                       num_key_value_heads=1, hidden_size=32))
    for name, family, cls, cfgcls, extra in (("qwen3", "Qwen3", "Qwen3Model", "Qwen3Config", {}),
                                             ("gemma3", "Gemma 3", "Gemma3TextModel", "Gemma3TextConfig",
                                              dict(sliding_window=4, query_pre_attn_scalar=8))):
        specs.append(Spec(f"{name}-d23-sdpa", family, _hf(cls, cfgcls, "sdpa", head_dim=8, **extra, **gqa),
                          _text_inputs(), "d23", "sdpa", dynamic=TEXT_DYN))
    # Cohere: a q/k LayerNorm whose weight is per head, [H, D]: sliced with the heads
    # (its TorchScript export does not run on ONNX Runtime: a Mul broadcasts 4 by 8)
    add("cohere", "Cohere", "CohereModel", "CohereConfig", _text_inputs(), TEXT_DYN, exporters=("d18",),
        use_qk_norm=True, **gqa)
    # OLMo-2 normalises q and k over all heads at once (RMSNorm over H*D): that mixes heads, and is refused
    add("olmo2", "OLMo-2", "Olmo2Model", "Olmo2Config", _text_inputs(), TEXT_DYN, exporters=("ts",),
        refused="outside the block", **gqa)
    # StableLM: a LayerNorm per head on q and k (Split into H parts, one LayerNormalization each, Concat)
    # and rotary on a quarter of each head
    add("stablelm", "StableLM", "StableLmModel", "StableLmConfig", _text_inputs(), TEXT_DYN, qk_layernorm=True,
        partial_rotary_factor=0.25, **gqa)
    add("mistral", "Mistral", "MistralModel", "MistralConfig", _text_inputs(), TEXT_DYN,
        sliding_window=None, head_dim=8, **gqa)
    # rotary on part of the head (Phi), interleaved rotary (GPT-J)
    add("phi", "Phi", "PhiModel", "PhiConfig", _text_inputs(), TEXT_DYN, partial_rotary_factor=0.5,
        max_position_embeddings=64, **small, **dec)
    add("gptj", "GPT-J", "GPTJModel", "GPTJConfig", _text_inputs(), TEXT_DYN,
        n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, **dec)
    # CodeGen packs q, v and k per 4 shards: its heads form a 4 x 2 grid, planned as rectangles of it
    add("codegen", "CodeGen", "CodeGenModel", "CodeGenConfig", _text_inputs(), TEXT_DYN,
        n_embd=32, n_head=8, n_layer=2, n_positions=64, rotary_dim=2, **dec)
    # DeBERTa-v2: disentangled attention, scores gathered with GatherElements on [B*H, S, 2k], position keys
    # tiled over the batch with repeats (B*H)/H
    add("deberta-v2", "DeBERTa-v2", "DebertaV2Model", "DebertaV2Config", _text_inputs(), TEXT_DYN,
        vocab_size=64, max_position_embeddings=64, relative_attention=True, position_buckets=8,
        pos_att_type=["p2c", "c2p"], **small)
    add("beit", "BEiT", "BeitModel", "BeitConfig", _pixel_inputs(16), PIXEL_DYN, image_size=16, patch_size=8,
        use_relative_position_bias=True, **small)
    # SigLIP's vision tower ends in a pooling head: nn.MultiheadAttention of a learned probe over the patches
    # (3-D, [B*H, 1, S] inside), after two encoder blocks
    add("siglip-vision", "SigLIP vision", "SiglipVisionModel", "SiglipVisionConfig", _pixel_inputs(16), PIXEL_DYN,
        outputs=("last_hidden_state", "pooler_output"), image_size=16, patch_size=8, vision_use_head=True,
        **small)
    add("albert", "ALBERT", "AlbertModel", "AlbertConfig", _text_inputs(), TEXT_DYN, vocab_size=64,
        embedding_size=16, max_position_embeddings=64, **small)
    return specs + _seq2seq_specs() + _torch_nn_specs() + _onnx_attention_specs() + _sdpa_runtime_scale_specs()


def quant_base_specs() -> list[Spec]:
    """The fp32 models that ``tools/quantize_models.py`` quantizes (into a cache; only the quantized forms
    go in ``models/``): widths at which the quantizers' blocks of 32 and 128 rows meet real head sizes."""
    specs: list[Spec] = []
    # BERT with 4 heads of 64: a block of 32 rows lies in one head, a block of 128 spans two
    specs.append(Spec("bert-qbase-ts", "BERT", _hf("BertModel", "BertConfig", "eager", vocab_size=64,
                                                   max_position_embeddings=64, type_vocab_size=2, hidden_size=256,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   num_hidden_layers=2),
                      _text_inputs(type_ids=True), "ts", dynamic=TEXT_DYN))
    # Llama with 8 heads of 32 on 4 KV heads: a block of 128 rows spans four heads
    specs.append(Spec("llama-qbase-ts", "Llama", _hf("LlamaModel", "LlamaConfig", "eager", vocab_size=64,
                                                     hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                                                     intermediate_size=128, num_hidden_layers=2,
                                                     max_position_embeddings=64, use_cache=False),
                      _text_inputs(), "ts", dynamic=TEXT_DYN))
    return specs


def _onnx_attention_specs() -> list[Spec]:
    """A decoder whose attention is ``torch.onnx.ops.attention`` on 3-D Q/K/V [B, S, heads * D] with
    ``q_num_heads`` 8 and ``kv_num_heads`` 2 (GQA, causal): torch.onnx writes the ONNX ``Attention`` op in
    its 3-D form, with the head counts as attributes."""
    def build():
        import types

        import torch

        class Layer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.norm1, self.norm2 = torch.nn.LayerNorm(64), torch.nn.LayerNorm(64)
                self.q, self.k, self.v = torch.nn.Linear(64, 64), torch.nn.Linear(64, 16), torch.nn.Linear(64, 16)
                self.o = torch.nn.Linear(64, 64)
                self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

            def forward(self, x):
                h = self.norm1(x)
                y = torch.onnx.ops.attention(self.q(h), self.k(h), self.v(h), is_causal=True,
                                             q_num_heads=8, kv_num_heads=2)[0]
                x = x + self.o(y)
                return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))

        class Decoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([Layer(), Layer()])

            def forward(self, hidden_states, return_dict=True):
                for layer in self.layers:
                    hidden_states = layer(hidden_states)
                return types.SimpleNamespace(last_hidden_state=hidden_states)
        return _randomize(Decoder())

    def inputs():
        import torch
        return {"hidden_states": torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(SEED))}

    dyn = {"hidden_states": {0: "batch", 1: "sequence"}}
    return [Spec("onnx-attention-3d-d23", "ONNX Attention, 3-D", build, inputs, "d23", dynamic=dyn)]


def _sdpa_runtime_scale_specs() -> list[Spec]:
    """A BERT-shaped encoder whose attention is ``F.scaled_dot_product_attention`` without ``scale``, as
    transformers 4.x's ``BertSdpaSelfAttention`` calls it (Optimum's exports of MiniLM): TorchScript then
    computes the scale at run time from the queries' head size, ``sqrt(1 / sqrt(Shape(q)[-1]))`` multiplied
    into q and k, which a cut inside the heads must pin to the original head size."""
    def build():
        import types

        import torch

        class Layer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))
                self.norm1, self.norm2 = torch.nn.LayerNorm(32), torch.nn.LayerNorm(32)
                self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

            def forward(self, x, mask):
                b, s, _ = x.shape
                q, k, v = (p(x).view(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                x = self.norm1(x + self.o(y.transpose(1, 2).reshape(b, s, 32)))
                return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(64, 32)
                self.layers = torch.nn.ModuleList([Layer(), Layer()])

            def forward(self, input_ids, attention_mask, return_dict=True):
                x = self.embed(input_ids)
                mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
                for layer in self.layers:
                    x = layer(x, mask)
                return types.SimpleNamespace(last_hidden_state=x)
        return _randomize(Encoder())

    return [Spec("sdpa-runtime-scale-ts", "SDPA, scale from the runtime head size", build, _text_inputs(), "ts",
                 "sdpa", dynamic=TEXT_DYN)]


def _torch_nn_specs() -> list[Spec]:
    """PyTorch's own nn.TransformerEncoder (nn.MultiheadAttention: one packed in_proj, out_proj as Gemm).
    Its TorchScript trace bakes the sequence length into reshapes, so that export has fixed input sizes."""
    def build(randomize=True):
        import types

        import torch
        torch.backends.mha.set_fastpath_enabled(False)    # the fused kernel has no ONNX export

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
                self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

            def forward(self, hidden_states, return_dict=True):
                return types.SimpleNamespace(last_hidden_state=self.encoder(hidden_states))
        return _randomize(Encoder()) if randomize else Encoder().eval()

    def inputs():
        import torch
        return {"hidden_states": torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(SEED))}

    dyn = {"hidden_states": {0: "batch", 1: "sequence"}}
    # as nn.TransformerEncoder makes them, the layers start as copies of one another: the TorchScript exporter
    # then stores each weight once and gives the other layers an Identity of it
    return [Spec("torch-encoder-ts", "PyTorch nn.TransformerEncoder", build, inputs, "ts"),
            Spec("torch-encoder-cloned-ts", "PyTorch nn.TransformerEncoder", lambda: build(False), inputs, "ts"),
            Spec("torch-encoder-d18", "PyTorch nn.TransformerEncoder", build, inputs, "d18", dynamic=dyn)]


def _seq2seq_specs() -> list[Spec]:
    import torch
    specs = []

    def bart_inputs():
        feeds = _text_inputs()()
        feeds["decoder_input_ids"] = torch.tensor([[2, 5, 7], [2, 9, 4]])
        return feeds

    bart_dyn = dict(TEXT_DYN, decoder_input_ids={0: "batch", 1: "decoder_sequence"})
    for ex in ("ts", "d18"):
        specs.append(Spec(f"bart-{ex}", "BART", _hf(
            "BartModel", "BartConfig", "eager", vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64, use_cache=False), bart_inputs, ex,
            outputs=("last_hidden_state", "encoder_last_hidden_state"), dynamic=bart_dyn))

    for ex in ("ts", "d18"):      # the decoder's cross-attention has a position bias of zeros (ConstantOfShape)
        specs.append(Spec(f"t5-{ex}", "T5", _hf(
            "T5Model", "T5Config", "eager", vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
            num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
            use_cache=False), bart_inputs, ex,
            outputs=("last_hidden_state", "encoder_last_hidden_state"), dynamic=bart_dyn))

    def whisper_inputs():
        g = torch.Generator().manual_seed(SEED)
        return {"input_features": torch.randn(2, 8, 32, generator=g),
                "decoder_input_ids": torch.tensor([[1, 5, 7], [1, 9, 4]])}

    whisper_dyn = {"input_features": {0: "batch"}, "decoder_input_ids": {0: "batch", 1: "decoder_sequence"}}
    for ex in ("ts", "d18"):
        specs.append(Spec(f"whisper-{ex}", "Whisper", _hf(
            "WhisperModel", "WhisperConfig", "eager", vocab_size=64, num_mel_bins=8, d_model=32,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, use_cache=False), whisper_inputs, ex,
            outputs=("last_hidden_state", "encoder_last_hidden_state"), dynamic=whisper_dyn))
    return specs


class _Wrap:
    """Calls a transformers model with named inputs and returns chosen outputs as a tuple."""

    def __new__(cls, model, names, outputs):
        import torch

        class W(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(**dict(zip(names, args)), return_dict=True)
                return tuple(getattr(out, o) for o in outputs)
        return W().eval()


def export(spec: Spec, out_dir: Path) -> Path:
    import torch
    torch.manual_seed(SEED)
    model = spec.build()
    feeds = spec.inputs()
    names = list(feeds)
    wrapped = _Wrap(model, names, spec.outputs)
    path = out_dir / f"{spec.name}.onnx"
    dyn = {k: v for k, v in spec.dynamic.items() if k in feeds}
    kwargs = dict(input_names=names, output_names=list(spec.outputs), dynamic_axes=dyn)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if spec.exporter == "ts":
            torch.onnx.export(wrapped, tuple(feeds.values()), str(path), dynamo=False, opset_version=17,
                              do_constant_folding=True, **kwargs)
        else:
            opset = 18 if spec.exporter == "d18" else 23
            dim = torch.export.Dim.DYNAMIC
            shapes = tuple({ax: dim for ax in dyn.get(n, {})} or None for n in names)
            # At opset 23, torch.onnx's own optimize pass fuses RoPE into the ONNX RotaryEmbedding op with a
            # [1, S, D/2] cos/sin cache, which ONNX Runtime 1.32 rejects at every input size. Those models use
            # onnxscript's optimizer (constant folding, no fusions) instead.
            prog = torch.onnx.export(wrapped, tuple(feeds.values()), dynamo=True, opset_version=opset,
                                     optimize=opset < 23, verbose=False, dynamic_shapes=(shapes,),
                                     input_names=names, output_names=list(spec.outputs))
            if opset >= 23:
                import onnx
                import onnxscript.optimizer
                onnx.save(onnxscript.optimizer.optimize(prog.model_proto), str(path))
            else:
                prog.save(str(path), external_data=False)
    _check_against_torch(path, wrapped, feeds)
    return path


def _check_against_torch(path: Path, wrapped, feeds):
    """The export must run on ONNX Runtime and give what PyTorch gives on the example inputs."""
    import numpy as np
    import onnxruntime as ort
    import torch
    with torch.no_grad():
        expected = wrapped(*feeds.values())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    for e, g in zip(expected, got):
        err = float(np.abs(e.numpy() - g).max())
        if err > 1e-4:
            raise RuntimeError(f"{path.name}: ONNX Runtime differs from PyTorch by {err:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="export names containing this (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the model names and exit")
    ap.add_argument("--out", type=Path, default=MODELS)
    args = ap.parse_args(argv)
    specs = [s for s in _specs() if not args.only or any(o in s.name for o in args.only)]
    if args.list:
        for s in specs:
            print(f"{s.name:24} {s.family:12} {s.exporter} {s.attn}")
        return 0
    import onnx
    import torch
    import transformers
    args.out.mkdir(parents=True, exist_ok=True)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "onnx": onnx.__version__}
    entries, failed = {}, []
    for spec in specs:
        try:
            path = export(spec, args.out)
        except Exception as exc:   # keep going: report every failure at the end
            failed.append(spec.name)
            print(f"FAIL {spec.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
            continue
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        entries[path.name] = {
            "family": spec.family, "exporter": spec.exporter, "attention": spec.attn,
            "opset": {"ts": 17, "d18": 18, "d23": 23}[spec.exporter],
            "command": f"python tools/export_models.py --only {spec.name}",
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        if spec.refused:
            entries[path.name]["refused"] = spec.refused
        print(f"ok   {path.name:28} {path.stat().st_size / 1024:7.1f} KiB")
    record(entries, versions, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
