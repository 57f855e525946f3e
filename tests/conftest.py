from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def models_dir():
    return MODELS
