"""What an importance source is (``Source``) and what it is given (``ImportanceContext``): the one module the
sources import, below the registry that finds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Source:
    name: str
    help: str                  # one line for --help: what the score measures
    score: Callable            # (ImportanceContext) -> {block index: np.ndarray [H]}
    calibrated: bool = False   # runs the model on calibration data (``--calib``, or synthetic inputs)
    outputs: bool = True       # calibrated: reads the model's outputs (a loss), not only the heads' contexts
    order: int = 50            # where it is listed in --help


@dataclass
class ImportanceContext:
    model: object                       # onnx.ModelProto
    blocks: tuple
    options: object                     # PruneOptions (importance_initializer, the file, ...)
    graph: object = None                # onnx_graphsurgeon.Graph of ``model``, external data attached
    gate_scores: dict | None = None     # head gates folded into the projections: their values per block
    make_calibration: Callable | None = field(default=None, repr=False)
    session: object = field(default=None, repr=False)      # the calibration session, once made (or given)

    @property
    def calibration(self):
        """The shared calibration session, made on first use."""
        if self.session is None:
            self.session = self.make_calibration()
        return self.session
