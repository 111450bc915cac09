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


def logic_with_model(checkpoint: Path):
    """A SegmentationLogic whose worker has loaded `checkpoint` on the CPU; the worker stops afterwards.

    For module fixtures: `yield from logic_with_model(path)`.
    """
    from MedSAM2HITLLib.logic import SegmentationLogic

    logic = SegmentationLogic()
    logic.load_model(checkpoint, device="cpu", threads=2).wait(120)
    yield logic
    logic.stop_worker()
