"""An Olive pass: ``OnnxPrune`` runs onnxprune inside a Microsoft Olive workflow (``pip install
"onnxprune[olive]"``), so that a deployment pipeline can prune before it quantizes or fuses.

Olive finds a third-party pass through a *package config*, a JSON file that maps pass names to classes.
``olive run --package-config`` replaces Olive's own table with the one given, so the file must list Olive's
passes too: ``python -m onnxprune.olive -o olive_config.json`` writes Olive's installed table with
``OnnxPrune`` added (the entry itself ships as ``onnxprune/olive_config.json``). Then:

    python -m onnxprune.olive -o olive_config.json
    olive run --config prune_then_quantize.json --package-config olive_config.json

with a pass such as ``{"type": "OnnxPrune", "ratio": 0.5}`` before the quantization pass (see
``examples/olive/``). The parameters are the prune command's options with underscores (``ratio``,
``attention_ratio``, ``qk_dims``, ``importance``, ``scope``, ``gqa``, ``compensate``...); calibration data
is ``calib`` (a ``DATA.npz`` made by ``onnxprune calib``) or an Olive ``data_config``, whose batches are
gathered into one (up to ``calib_samples`` samples). The pass runs the prune command itself, so the pruned
model is proved equal to the masked original before Olive sees it, and a model folder (an Olive model whose
``model_path`` is a directory: GenAI, Optimum) comes out as a pruned folder with its configs updated. Errors
are the command's one-line errors (``OnnxPruneError``). The per-block report is written beside the pruned
model as ``onnxprune_report.json``.

This module is the only one that imports ``olive``; nothing else in the package needs it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import InputError, OnnxPruneError
from .options import PruneOptions

try:
    from olive.data.config import DataConfig
    from olive.model import ONNXModelHandler
    from olive.passes import Pass
    from olive.passes.pass_config import BasePassConfig, PassConfigParam
except ImportError as exc:          # a one-line reason, not Olive's traceback
    raise ImportError(f"onnxprune.olive needs Microsoft Olive: pip install \"onnxprune[olive]\" ({exc})") from None

ENTRY = Path(__file__).with_name("olive_config.json")   # {"passes": {"OnnxPrune": {...}}}
REPORT = "onnxprune_report.json"

# (name, type, default, what it does): the prune command's options, one flag each; where the name is a
# PruneOptions field, its default is PruneOptions' own (``_default``)
_OPTIONS = (
    ("ratio", Optional[float], None, "share of heads to remove in every block: keeps floor(H * (1 - ratio))"),
    ("threshold", Optional[float], None, "keep the heads whose importance is at least this"),
    ("heads_to_prune", Optional[str], None, "a JSON file {block: [heads to remove]}, Hugging Face style"),
    ("attention_ratio", Optional[float], None, "share of attention MACs to remove, spent per block on heads "
                                               "and ranks inside them (needs calibration data)"),
    ("qk_dims", Optional[float], None, "share of each head's QK rank to remove"),
    ("v_dims", Optional[float], None, "share of each head's OV rank (V's head size) to remove"),
    ("importance", Optional[str], None, "weights, activation, ablation, mean-ablation, initializers, or a "
                                        ".json/.npy file of scores"),
    ("scope", str, None, "layer: the same share in every block; global: rank all heads together"),
    ("gqa", Optional[str], None, "group: remove whole KV groups (the cache shrinks); uniform: query heads "
                                 "from every group"),
    ("compensate", Optional[str], None, "auto, bias, scale or refit: recover the dropped heads on the "
                                        "calibration data"),
    ("min_heads", int, None, "every block keeps at least this many heads"),
    ("multiple_of", Optional[int], None, "round kept heads x head size (or each rank) up to a multiple of this"),
    ("calib", Optional[str], None, "calibration data: a DATA.npz of graph inputs (onnxprune calib makes it)"),
    ("data_config", Optional[Union[DataConfig, dict]], None, "calibration data as an Olive data config "
                                                             "(instead of calib)"),
    ("calib_samples", int, 64, "at most this many samples are taken from data_config"),
    ("synthetic_calib", bool, False, "let calibrated scores and compensation run on synthetic inputs"),
    ("verify", bool, None, "prove pruned == masked original on ONNX Runtime before writing"),
    ("atol", Optional[float], None, "the proof's tolerance (1e-4 fp32, 1e-2 fp16)"),
    ("strict", bool, False, "refuse a model with attention-like nodes that were not matched"),
)


def _default(name: str, given):
    """PruneOptions' default for ``name`` where it is one of its fields (one source for both), else ``given``."""
    found = {f.name: f.default for f in fields(PruneOptions)}.get(name, MISSING)
    return given if found is MISSING else found


def _flags(config: dict, model_path: Path, out: str, report: Path, calib: Optional[Path]) -> list[str]:
    """The prune command's arguments for ``config`` (the pass's parameters)."""
    argv = [str(model_path), "-o", out, "--report", str(report)]
    for name, _, default, _ in _OPTIONS:
        value = config.get(name, _default(name, default))
        if name in ("data_config", "calib_samples", "calib", "verify") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    if not config.get("verify", True):
        argv.append("--no-verify")
    if calib is not None:
        argv += ["--calib", str(calib)]
    return argv


def _gather(reader, limit: int) -> dict[str, np.ndarray]:
    """The batches of an ORT calibration reader (what Olive's data configs give) as one set of arrays, samples
    along axis 0, at most ``limit`` samples."""
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    while count < limit:
        batch = reader.get_next()
        if batch is None:
            break
        arrays = {k: np.asarray(v) for k, v in batch.items()}
        if set(parts) and set(arrays) != set(parts):
            raise InputError(f"data_config: a batch has inputs {sorted(arrays)}, the first had {sorted(parts)}")
        sizes = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        for k, a in arrays.items():
            parts.setdefault(k, []).append(a if a.ndim else a[None])
        count += max(sizes)
    if not parts:
        raise InputError("data_config: it gave no batches")
    return {k: np.concatenate(v)[:limit] for k, v in parts.items()}


class PruneFailed(ValueError):
    """onnxprune refused or failed (its one-line reason, and ``exit_code`` as the command gives it). A
    ``ValueError``, because Olive stops a workflow on those (a user's error) and retries or logs the rest."""

    def __init__(self, error: OnnxPruneError):
        super().__init__(f"OnnxPrune: {error}")
        self.exit_code = error.exit_code


class OnnxPrune(Pass):
    """Remove attention heads (or cut inside them) from an ONNX transformer with onnxprune, proved equal to
    the original with the same heads masked."""

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        return {name: PassConfigParam(type_=kind, default_value=_default(name, default), description=text)
                for name, kind, default, text in _OPTIONS}

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        try:
            return self._prune(model, config, output_model_path)
        except OnnxPruneError as exc:
            raise PruneFailed(exc) from None

    def _prune(self, model, config, output_model_path: str) -> ONNXModelHandler:
        from .cli import run_prune
        settings = config.model_dump() if hasattr(config, "model_dump") else dict(config)
        if settings.get("calib") and settings.get("data_config"):
            raise InputError("OnnxPrune: give calib or data_config, not both")
        source = Path(model.model_path)
        folder = model.onnx_file_name is not None       # Olive's model folder: prune it as a folder
        given = Path(output_model_path)                  # Olive gives a path in its cache, often with no suffix
        out_dir = given.parent if given.suffix == ".onnx" else given
        target = given if given.suffix == ".onnx" and not folder else out_dir / source.name
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="onnxprune-olive-") as tmp:
            calib = Path(settings["calib"]) if settings.get("calib") else None
            if settings.get("data_config"):
                from olive.common.config_utils import validate_config
                data = validate_config(settings["data_config"], DataConfig)
                reader = data.to_data_container().create_calibration_dataloader(
                    model_path=str(source), io_config=model.io_config)
                calib = Path(tmp) / "calib.npz"
                np.savez(calib, **_gather(reader, int(settings.get("calib_samples") or 64)))
            # the report is written with the model, in the same run; a folder is written with a copy of what
            # lies beside the input (a report of an earlier prune, say), so its report is moved in after
            report = Path(tmp) / REPORT if folder else out_dir / REPORT
            run_prune(_flags(settings, source, str(out_dir) + "/" if folder else str(target), report, calib))
            written = report.read_bytes()
            if folder:
                (out_dir / REPORT).write_bytes(written)
        external = json.loads(written).get("external_data", False)
        if folder or external:
            return ONNXModelHandler(model_path=str(out_dir), onnx_file_name=target.name,
                                    model_attributes=model.model_attributes)
        return ONNXModelHandler(model_path=str(target), model_attributes=model.model_attributes)


def package_config() -> dict:
    """Olive's own package config (the installed version's) with ``OnnxPrune`` added: what ``olive run
    --package-config`` needs, since it replaces Olive's table instead of adding to it."""
    from olive.package_config import OlivePackageConfig
    table = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    table.setdefault("passes", {}).update(json.loads(ENTRY.read_text())["passes"])
    return table


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m onnxprune.olive",
                                description="Write the Olive package config that adds onnxprune's OnnxPrune "
                                            "pass to Olive's own passes (for olive run --package-config).")
    p.add_argument("-o", "--output", help="the file to write (default: standard output)")
    args = p.parse_args(argv)
    text = json.dumps(package_config(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
