"""Fingerprints of what the pruner writes for every model in ``models/``, to show that a change of the code's
structure changed no output: run it on the old code and on the new, then compare the two files.

    PYTHONPATH=/path/to/old/checkout python tools/identical.py -o old.json
    python tools/identical.py -o new.json --against old.json

Three runs a model: ratio 0.5; ratio 0.25 with ``scope="global"``; ratio 0.5 with calibration data (synthetic,
fixed seed) and ``compensate="auto"``. A run that fails records its error's text, so that a change of which
runs fail (or of their messages) shows too. No torch needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"

CONFIGS = {
    "ratio 0.5": dict(ratio=0.5),
    "ratio 0.25 global": dict(ratio=0.25, scope="global"),
    "ratio 0.5 calib compensate": dict(ratio=0.5, compensate="auto", calib=True),
}


def model_paths() -> list[Path]:
    files = sorted(MODELS.glob("*.onnx"))
    files += sorted(p / "model.onnx" for p in MODELS.iterdir() if (p / "model.onnx").is_file())
    return files


def fingerprint(path: Path, config: dict) -> str:
    from onnxprune import prune_model
    from onnxprune.errors import OnnxPruneError
    import onnx
    kwargs = dict(config)
    if kwargs.pop("calib", False):
        from onnxprune import probe
        synth = getattr(probe, "synth_inputs", None)
        if synth is None:
            from onnxprune.inputs import synth_inputs as synth
        kwargs["calib"] = synth(onnx.load(str(path), load_external_data=False), seed=5, batch=24, seq=8)
    try:
        result = prune_model(str(path), **kwargs)
    except OnnxPruneError as exc:
        return f"error {type(exc).__name__}: {exc}"
    digest = hashlib.sha256(result.model.SerializeToString(deterministic=True)).hexdigest()
    return f"{digest} max_error={result.max_error!r} kept={sorted(result.kept.items())}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="JSON file of fingerprints to write")
    ap.add_argument("--against", help="an earlier output to compare with: exit 1 on any difference")
    ap.add_argument("--only", help="substring of the model paths to run")
    args = ap.parse_args(argv)
    out, start = {}, time.time()
    for path in model_paths():
        rel = str(path.relative_to(MODELS))
        if args.only and args.only not in rel:
            continue
        for name, config in CONFIGS.items():
            out[f"{rel} | {name}"] = fingerprint(path, config)
        print(f"{time.time() - start:6.0f}s {rel}", file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps(out, indent=1, sort_keys=True))
    if not args.against:
        return 0
    old = json.loads(Path(args.against).read_text())
    diff = [k for k in sorted(set(old) | set(out)) if old.get(k) != out.get(k)]
    for k in diff:
        print(f"DIFFERENT {k}\n  old: {old.get(k)}\n  new: {out.get(k)}")
    print(f"{len(out) - len(diff)} identical, {len(diff)} different")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
