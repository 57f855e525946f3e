"""Every choice a prune run takes, in one frozen and validated object. The command line only parses into
it, and ``prune_model``'s keywords build it. The defaults are set here and nowhere else."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import PlanError
from .importance import check_source
from .plan import exact_ratio
from .transforms.compensate import COMPENSATE_MODES

SCOPES = ("layer", "global")
GQA_MODES = ("group", "uniform")
ATOL = 1e-4             # pruned == masked, fp32
ATOL_FP16 = 1e-2        # fp16 weights: ORT's fp16 kernels differ by this much on the same math
DECODE_CONTEXT = 4096   # the cached tokens per sequence at which the report prices a decode step


@dataclass(frozen=True)
class SpeedTarget:
    """``--target-speedup``: a speed-up to reach on ``provider``, for a forward pass at ``batch`` x ``seq`` (an
    encoder, an LLM's prompt), or with ``context`` for a decode step against that many cached tokens."""

    speedup: float
    provider: str = "cpu"
    batch: int = 1
    seq: int = 128
    context: int | None = None


PROOFS = ("auto", "whole", "segments", "blocks")


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and how. Exactly one selection: ``ratio``, ``threshold``, ``kept`` ({block: heads to
    keep}) or ``heads_to_prune`` ({block: heads to remove}).

    ``importance``: {block index: scores}, a source name (see ``importance.SOURCES``) or a .json/.npy
    file; None: the model's stored scores, else gates, else ``weights``. ``calib``: {graph input: samples
    on axis 0} for the calibrated sources and ``compensate``. ``gqa``: None picks ``group`` for a model with
    a KV cache, else ``uniform``. ``verify``: prune == masked is checked on ``feeds`` (synthetic when None)
    and a difference beyond ``atol`` (None: 1e-4, 1e-2 for fp16 weights) raises ``VerifyError``.
    ``external_dir``: the folder of the model's external data, when it was loaded without it. ``qk_dims`` and
    ``v_dims``: cut inside every kept head, its QK circuit (scores) or its OV circuit (V's head size and the
    output projection's rows) to ``floor(D * (1 - share))`` of its D dimensions, fitted from ``calib`` (from
    the weights alone without it); given alone, every head stays."""

    ratio: object = None
    threshold: float | None = None
    kept: Mapping[int, tuple] | None = None
    heads_to_prune: Mapping[int, tuple] | None = None
    min_heads: int = 1
    scope: str = "layer"
    importance: object = None
    importance_initializer: str | None = None
    calib: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)
    compensate: str | None = None
    gqa: str | None = None
    multiple_of: int | None = None
    verify: bool = True
    atol: float | None = None
    feeds: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)
    external_dir: str | os.PathLike | None = None
    qk_dims: object = None        # share of each head's QK rank to remove (floor arithmetic, like ratio)
    v_dims: object = None         # share of each head's OV rank (V's head size) to remove
    attention_ratio: object = None   # share of the attention MACs to remove, spent by ``budget.plan_budget``
    compensate_implied: bool = False  # ``compensate`` set by the budget, not asked for (a quantized model skips it)
    uniform_blocks: bool = False     # the budget keeps every block alike (a GenAI folder's config holds one head
    # count and one head size for all layers)
    target: SpeedTarget | None = None    # a measured speed-up to reach instead of a share of MACs (``speed.py``)
    proof: str = "auto"          # the proof's models run whole, in segments (``segments.py``), or block by block
    # (``blockproof.py``); auto: whole where they fit in memory, else block by block
    provider: str = "cpu"        # where calibration and the proof run (``runtime.PROVIDERS``; cuda: onnxruntime-gpu)
    latency: object = field(default=None, compare=False, repr=False)   # its ``budget.LatencyModel``, measured

    def __post_init__(self):
        chosen = [n for n in ("ratio", "threshold", "kept", "heads_to_prune") if getattr(self, n) is not None]
        if not chosen and any(getattr(self, n) is not None for n in ("qk_dims", "v_dims", "attention_ratio", "target")):
            # dims alone: every head stays
            object.__setattr__(self, "ratio", 0)
            chosen = ["ratio"]
        for name in ("qk_dims", "v_dims", "attention_ratio"):
            value = getattr(self, name)
            if value is not None:
                try:
                    exact_ratio(value)
                except ValueError as exc:
                    raise PlanError(f"{name.replace('_', '-')}: {exc}") from None
        if len(chosen) != 1:
            raise PlanError("give exactly one of ratio, threshold, kept, heads_to_prune"
                            + (f" (got {', '.join(chosen)})" if chosen else ""))
        if self.ratio is not None:
            try:
                exact_ratio(self.ratio)
            except ValueError as exc:
                raise PlanError(str(exc)) from None
        if self.target is not None:
            if not (finite_number(self.target.speedup) and self.target.speedup > 1):
                raise PlanError(f"--target-speedup must be a number above 1, got {self.target.speedup!r}")
            if self.attention_ratio is not None:
                raise PlanError("give one of --attention-ratio (a share of the MACs) and --target-speedup (a "
                                "measured speed-up), not both")
        budget = "--attention-ratio" if self.attention_ratio is not None else \
            "--target-speedup" if self.target is not None else None
        if budget:
            if self.qk_dims is not None or self.v_dims is not None:
                raise PlanError(f"{budget} chooses the ranks itself; give it without --qk-dims/--v-dims")
            if chosen != ["ratio"] or exact_ratio(self.ratio) != 0:
                raise PlanError(f"{budget} chooses the heads and ranks itself; give it "
                                "without --ratio, --threshold or --heads-to-prune")
            if self.calib is None:
                raise PlanError(f"{budget} measures each cut on calibration data; give --calib DATA.npz")
            if self.compensate is None:       # the budget's cuts are recovered unless told otherwise
                object.__setattr__(self, "compensate", "auto")
                object.__setattr__(self, "compensate_implied", True)
        if self.threshold is not None and not finite_number(self.threshold):
            raise PlanError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.multiple_of is not None:
            if self.ratio is None and self.threshold is None:
                raise PlanError("--multiple-of rounds the plans of --ratio and --threshold, not a list of heads")
            if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
                raise PlanError(f"--multiple-of must be a whole number >= 1, got {self.multiple_of!r}")
        if isinstance(self.min_heads, bool) or not isinstance(self.min_heads, int) or self.min_heads < 0:
            raise PlanError(f"min_heads must be a whole number >= 0, got {self.min_heads!r}")
        if self.scope not in SCOPES:
            raise PlanError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.gqa is not None and self.gqa not in GQA_MODES:
            raise PlanError(f"unknown GQA mode {self.gqa!r}; use one of {', '.join(GQA_MODES)}")
        if self.compensate is not None and self.compensate not in COMPENSATE_MODES:
            raise PlanError(f"unknown compensation {self.compensate!r}; use one of {', '.join(COMPENSATE_MODES)}")
        if self.proof not in PROOFS:
            raise PlanError(f"unknown proof {self.proof!r}; use one of {', '.join(PROOFS)}")
        if self.provider not in ("cpu", "cuda"):
            raise PlanError(f"unknown provider {self.provider!r} for calibration and the proof; use cpu or cuda")
        self.providers()        # refused now, before any work, where this onnxruntime lacks it
        if self.atol is not None and not (finite_number(self.atol) and self.atol >= 0):
            raise PlanError(f"atol must be a finite number >= 0, got {self.atol!r}")
        check_source(self.importance)

    @property
    def cuts_dims(self) -> bool:
        """Whether the run cuts inside the heads (``qk_dims``, ``v_dims``, ``attention_ratio`` or a ``target``)."""
        return self.budget or any(getattr(self, n) not in (None, 0) for n in ("qk_dims", "v_dims"))

    @property
    def budget(self) -> bool:
        """Whether the budget plans the cut (``attention_ratio`` or a speed ``target``)."""
        return self.attention_ratio is not None or self.target is not None

    @property
    def selects_by_score(self) -> bool:
        """Whether the plan follows importance scores (a ratio or a threshold), not lists of heads."""
        return self.ratio is not None or self.threshold is not None

    def tolerance(self, fp16: bool) -> float:
        return tolerance(self.atol, fp16)

    def providers(self, exact: bool = False) -> list | None:
        """ONNX Runtime's providers for calibration (and, ``exact``, for the proof); None: the CPU default."""
        if self.provider == "cpu":
            return None
        from .runtime import providers_for
        return providers_for(self.provider, exact)


def tolerance(atol: float | None, fp16: bool) -> float:
    """``atol``, or the default for the model's weights: 1e-4, 1e-2 for fp16."""
    return atol if atol is not None else (ATOL_FP16 if fp16 else ATOL)


def finite_number(x) -> bool:
    if isinstance(x, (bool, str, bytes)):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
