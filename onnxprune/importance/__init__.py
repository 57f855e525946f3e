"""Where head importance comes from: a registry of sources, one module per source.

Each module of this package defines ``SOURCE = Source(name, help, score, calibrated=...)``; the registry
finds them by itself, so a new importance method is one new module (and its test). The command line's
``--importance`` help and the API's checks are made from this registry.

A source's ``score(ctx)`` gets an ``ImportanceContext``: the model, its matched blocks, the graph, the
options and, for calibrated sources, the shared calibration session (``ctx.calibration``: one ONNX Runtime
session with the output projections fed as inputs, built once and shared by every calibrated method and by
compensation). It returns ``{block index: [score per head]}``; blocks left out are scored by ``weights``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import numpy as np

from ..calibration.session import finite
from ..errors import PlanError
from .source import ImportanceContext, Source


def _discover() -> dict[str, Source]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        source = getattr(module, "SOURCE", None)
        if isinstance(source, Source):
            found[source.name] = source
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


SOURCES: dict[str, Source] = _discover()
CALIBRATED = tuple(n for n, s in SOURCES.items() if s.calibrated)
NAMED = tuple(n for n in SOURCES if n != "file")     # what --importance takes by name


def is_file(importance) -> bool:
    return isinstance(importance, os.PathLike) or (isinstance(importance, str)
                                                   and importance.endswith((".json", ".npy")))


def check_source(importance):
    """None, {block: scores}, a registered name, or a .json/.npy file; anything else is a PlanError."""
    if importance is None or isinstance(importance, dict) or is_file(importance):
        return
    if not isinstance(importance, str) or importance not in NAMED:
        raise PlanError(f"unknown importance source {importance!r}; use one of {', '.join(NAMED)}, "
                        "or a .json/.npy file")


def default_calibrated(compensate: str | None) -> str:
    """The default with calibration data: what tools/fidelity.py measured best (README, Fidelity): the
    activation norm when the output projections are then compensated, the ablation score when they are not."""
    return "activation" if compensate not in (None, "none") else "ablation"


def choose(options, has_stored: bool, has_gates: bool) -> str:
    """The source a run uses: the one asked for; else the model's stored scores; else its folded head gates;
    else, with calibration data, the best calibrated method; else ``weights``."""
    imp = options.importance
    if isinstance(imp, dict):
        return "given"
    if is_file(imp):
        return "file"
    if imp is not None:
        return imp
    if has_stored or options.importance_initializer:
        return "initializers"
    if has_gates:
        return "gates"
    if options.calib is not None:
        return default_calibrated(options.compensate)
    return "weights"


def scores_for(name: str, ctx: ImportanceContext) -> dict[int, np.ndarray]:
    """Run source ``name`` on ``ctx``; every score checked finite, one per head."""
    from .weights import weight_importance
    if name == "given":
        raw = dict(ctx.options.importance)
    else:
        raw = SOURCES[name].score(ctx)
    out = {}
    for b in ctx.blocks:
        try:
            s = np.asarray(raw[b.index], dtype=np.float64) if b.index in raw else weight_importance(b, ctx.graph)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"importance scores must be numbers ({exc})") from None
        if s.shape != (b.num_heads,):
            raise PlanError(f"block {b.index} ({b.name}): {s.size} importance scores for {b.num_heads} heads")
        bad = np.flatnonzero(~np.isfinite(s))
        if bad.size:
            raise PlanError(f"block {b.index} ({b.name}): head {bad[0]} has importance {s[bad[0]]} ({name}); "
                            "scores must be finite")
        out[b.index] = s
    return out


def help_lines(width: int = 15, columns: int = 104) -> str:
    """The --importance part of --help: one entry per registered source, and how the default is chosen."""
    import textwrap
    lines = []
    for name, src in SOURCES.items():
        label = "FILE.json|npy" if name == "file" else name
        text = src.help.split(": ", 1)[1] if name == "file" else src.help
        lines += textwrap.wrap(text, columns, initial_indent=f"  {label:<{width}}",
                               subsequent_indent=" " * (width + 2))
    lines += textwrap.wrap("without --importance: the model's stored scores, else its head gates, else with "
                           "--calib the best calibrated method (ablation; activation with --compensate), else "
                           "weights", columns, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def calibrated_scores(cal, method: str) -> dict[int, np.ndarray]:
    """The scores of calibrated method ``method`` on calibration session ``cal`` (tools, tests), each checked
    finite."""
    if method not in CALIBRATED:
        raise PlanError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATED)}")
    scores = SOURCES[method].score(ImportanceContext(cal.model, tuple(cal.blocks), None, session=cal))
    for s in cal.sites:
        finite(scores[s.block.index], f"block {s.block.index} ({s.block.name}): its {method} scores")
    return scores
