"""A file of scores: JSON ``{"<block index or name>": [score per head]}`` or a ``[blocks, H]`` .npy array."""

from __future__ import annotations

from . import Source


def _score(ctx):
    from ..score import load_importance_file
    return load_importance_file(ctx.options.importance, ctx.blocks)


SOURCE = Source("file", 'FILE.json|npy: {"<block index or name>": [score per head]} or a [blocks, heads] '
                "array", _score, order=90)
