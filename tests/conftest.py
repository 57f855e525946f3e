import subprocess
import sys
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def models_dir():
    return MODELS


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The command line as a user runs it: a fresh interpreter, its output captured."""
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)
