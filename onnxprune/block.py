"""The description of one matched attention block: what the rewriter must change, and nothing more."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Projection:
    """A weight (or bias) that holds heads along ``head_axis``; ``role`` is q, k, v or o."""

    role: str
    weight: str
    bias: str | None
    head_axis: int


@dataclass(frozen=True)
class HeadTensor:
    """A tensor with head content: ``owner`` gives, over ``axes``, the unit owning each index (-1: none)."""

    name: str
    axes: tuple[int, ...]
    owner: np.ndarray = field(compare=False, repr=False)
    constant: bool = False
    cut: bool = False          # shared with other blocks: select the kept heads with a Gather before use
    copies: tuple[int, ...] = ()   # axes whose entries are broadcast copies (repeat_kv): only counts matter
    io: bool = False           # a graph input or output (a KV cache): its declared shape changes
    roles: frozenset = frozenset()   # where it is in the block: q, k, v (above the core), s (scores), o (context)
    dim_axis: int | None = None      # the head-size axis: one of ``axes`` when merged (F = H * D, each head's D
    # positions the run it owns), an axis of its own ([B, H, S, D]), or None (scores, probabilities)
    before_cut: bool = False        # above a norm over the head size (q/k norms): a QK cut keeps it whole and
    # starts below the norm (``AttentionBlock.cut_points``)
    dim_pos: np.ndarray | None = field(default=None, compare=False, repr=False)   # on an axis of its own: the
    # head-size position each index holds, where that is not 0..D-1 (a half of it sliced off for a rotary
    # embedding: 4..7; its halves swapped: 4..7, 0..3)


@dataclass(frozen=True)
class Table:
    """A tensor without heads that a node of the block multiplies (or adds) position by position along the head
    size: a rotary embedding's cos or sin. A cut that keeps some positions takes the same positions of it."""

    node: str
    input: int        # which input of ``node``
    axis: int         # the table's axis that lines up with the head size
    pairs: str = ""   # a rotary op's cos/sin cache, one entry per pair of the first ``2 x size`` positions:
    # "half" (pairs i, i + size) or "interleaved" (pairs 2i, 2i + 1); "": one entry per position


@dataclass(frozen=True)
class Site:
    """A node whose attribute or shape-like input encodes a head count: reshape, expand, split, slice,
    gather, concat or attr."""

    kind: str
    node: str
    op: str = ""        # the node's op type, its domain in front where it has one: com.microsoft.Attention


# onnxruntime's CPU GroupQueryAttention takes head sizes that are multiples of 16 ("head_size shall be a multiple
# of 16"): a cut inside its heads keeps such a rank
ONE_SIZE_STEP = 16


@dataclass(frozen=True)
class AttentionBlock:
    index: int
    name: str
    family: str
    core: str                               # the Softmax or Attention node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_groups: tuple[tuple[int, ...], ...]  # query heads served by each KV head
    units: tuple[frozenset, ...]            # owner values index this table
    projections: tuple[Projection, ...]
    tensors: tuple[HeadTensor, ...]
    sites: tuple[Site, ...]
    nodes: tuple[str, ...]
    tables: tuple[Table, ...] = ()          # cos/sin tables over the head size (rotary embeddings)
    pairs: tuple[tuple[int, ...], ...] = ()  # head-size positions that a node mixes (a rotary embedding's pairs):
    # a cut keeps each whole or none of it, and cannot rotate them
    cut_points: tuple[tuple[str, int, int], ...] = ()   # (node, input, axes after its head size) where a QK cut
    # starts, below a q/k norm: the norm sees every position, the node gets the kept ones (a Gather in front)
    norm_means: tuple[str, ...] = ()        # the ReduceMean nodes of RMS q/k norms that a QK cut passes (above
    # them): each is multiplied by kept / D; or fused RMS norm ops over the head size (GenAI's Gemma 3), whose
    # epsilon and weight are rescaled. The queries' side is then cut above its norm; the keys' too, unless
    # ``cut_points`` remain (one K head whose norm lies above its broadcast: cut there, below its norm)

    @property
    def selects_dims(self) -> bool:
        """Whether a cut of the QK circuit can only keep positions, not rotate them (a rotary embedding)."""
        return bool(self.tables or self.pairs or self.cut_points)

    @property
    def one_head_size(self) -> bool:
        """Whether the block's fused op has one head size for Q, K and V (ORT's GroupQueryAttention): its QK and
        OV circuits are cut to one rank, a multiple of ``ONE_SIZE_STEP`` where the head size is one."""
        return any(s.op == "com.microsoft.GroupQueryAttention" for s in self.sites)

    def rank_multiple(self, multiple_of: int | None = None) -> int | None:
        """What a kept rank is rounded up to a multiple of: ``multiple_of`` (``--multiple-of``), and for one head
        size also ``ONE_SIZE_STEP``, which onnxruntime's kernel needs (where the head size is one)."""
        if not self.one_head_size or self.head_dim % ONE_SIZE_STEP:
            return multiple_of
        return math.lcm(multiple_of or 1, ONE_SIZE_STEP)

    def qk_below(self, role: str) -> bool:
        """Whether a QK cut of ``role``'s side (q or k) starts below a q/k norm (``cut_points``), not above it."""
        return bool(self.cut_points) and (role == "k" or not self.norm_means)

    def kept_kv_heads(self, kept_heads) -> list[int]:
        """Indices of the KV heads that still serve at least one of ``kept_heads``."""
        kept = set(kept_heads)
        return [g for g, heads in enumerate(self.kv_groups) if kept & set(heads)]

    def projection(self, role: str) -> Projection | None:
        return next((p for p in self.projections if p.role == role), None)

    def tensor(self, name: str) -> HeadTensor:
        return next(t for t in self.tensors if t.name == name)

    @property
    def o_proj(self) -> Projection:
        return self.projection("o")


@dataclass(frozen=True)
class Miss:
    """A node that looked like attention but was not matched, and why."""

    node: str
    op: str
    reason: str

    @property
    def where(self) -> str:
        """The node by its name, else by its type; '' for the graph as a whole."""
        return self.node or (f"unnamed node of type {self.op}" if self.op else "")

    def describe(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


@dataclass(frozen=True)
class MatchResult:
    blocks: tuple[AttentionBlock, ...]
    misses: tuple[Miss, ...]
