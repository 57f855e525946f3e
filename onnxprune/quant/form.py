"""What a quantized form is (``Form``: the five operations every form has) and what it folds into the float
view (``Folded``): the one module the forms import, below the registry that finds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx


@dataclass(frozen=True)
class Folded:
    """One quantized weight of the real model and the float weight ``weight`` that stands for it in the
    view. ``nodes``: the real nodes that the view replaces (for ``dq``, the DequantizeLinear alone);
    ``anchor``: the name of the view node that stands for them (None for ``dq``: the float weight is an
    initializer read by the real nodes themselves, which go back before its first reader);
    ``data``/``scale``/``zero``: the initializers."""

    kind: str
    weight: str
    nodes: tuple
    anchor: str | None
    data: str
    scale: str
    zero: str | None
    extra: tuple = ()          # nbits: the bias initializer name, if any; integer: the activation's DQL
    view_nodes: tuple = ()     # the view nodes that stand for it, removed when it is folded back
    restore: tuple = ()        # real nodes that several folded weights share (a DynamicQuantizeLinear): put
    # back once, before the first of them; they also read the output projection's input (``masked``)


@dataclass
class FoldContext:
    """What a form's ``fold`` reads of the real model: its initializers, and each tensor's producer and
    readers."""

    inits: dict
    producer: dict
    readers: dict

    def fresh_name(self, name: str) -> str:
        """``name`` for a view weight, unless an initializer has it."""
        return name if name not in self.inits else f"{name}.dequantized"


@dataclass(frozen=True)
class Form:
    """One quantized form. ``detect(node, inits)``: ``node`` holds a weight of this form. ``size(node,
    inits)``: (its quantized data, the elements it dequantizes to, its scale and zero-point names).
    ``fold(node, ctx)``: (the ``Folded``, the float weight's dims and element type, {real node name: the
    view nodes in its place}), or None when this node is not to be folded. ``float_weight(folded,
    arrays)``: the float weight its data dequantizes to. ``cut(folded, keep, arrays)``: its initializers
    cut to ``keep`` ({axis of the float weight: kept positions}) by name, and "__attrs__" for attributes
    that change. ``by_readers``: ``detect`` only proposes; what reads the node decides, and ``fold`` says
    (a ``Cast`` of int8 data is a weight only where a ``Mul`` by a scale follows)."""

    kind: str
    label: str
    detect: Callable[[onnx.NodeProto, dict], bool]
    size: Callable
    fold: Callable
    float_weight: Callable
    cut: Callable
    by_readers: bool = False
