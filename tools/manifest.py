"""``models/MANIFEST.json``: what each file in ``models/`` is and the command that made it. Every export
script records its files through ``record``, so that the file keeps one layout and one order."""

from __future__ import annotations

import json
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"


def record(entries: dict[str, dict], versions: dict | None = None, folder: Path = MODELS):
    """Add or replace ``entries`` ({file path under models/: description}), keep the others, sort, write."""
    path = folder / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"models": {}}
    if versions is not None:
        manifest["versions"] = versions
    manifest["models"] = dict(sorted({**manifest["models"], **entries}.items()))
    path.write_text(json.dumps(manifest, indent=2) + "\n")
