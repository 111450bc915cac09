"""Shared fixtures: checkpoints the project makes itself (no weights can be downloaded here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSAM2HITL"))  # the Lib package, also when not pip-installed

DATA = REPO / "Testing" / "Data"
RANDOM_IMAGE_SIZE = 256  # the real MedSAM2 architecture at a smaller input, to keep the suite fast on CPU


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """MedSAM2's architecture at random init, saved once per session in the real checkpoint format.

    A `.yaml` beside it (the loader's convention) fixes image_size to RANDOM_IMAGE_SIZE.
    """
    from MedSAM2HITLLib.model import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("random_model") / "medsam2_random.pt", RANDOM_IMAGE_SIZE)
