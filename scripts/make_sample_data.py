"""Write the module's sample volume, MedSAM2HITL/Resources/SampleData/MedSAM2HITLPhantomCT.nrrd, and print its SHA256.

A synthetic CT phantom from the project's generator (int16 HU, 0.8 x 0.8 x 2.5 mm, LPS), small enough to ship with
the extension, so a new user can try Place ROI → Segment slice → Propagate in one click from Sample Data. Run from
the repository root, then put the printed digest into MedSAM2HITLLib/sample_data.py:

    .venv/bin/python scripts/make_sample_data.py
"""

import hashlib
import sys
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "Training"))
sys.path.insert(0, str(REPO / "MedSAM2HITL"))

from MedSAM2HITLLib.sample_data import SAMPLE_FILE  # noqa: E402
from phantoms import make_phantom  # noqa: E402

phantom = make_phantom(1_000_003, modality="ct")
image = sitk.GetImageFromArray(phantom.volume)  # [k, j, i]
image.SetSpacing((0.8, 0.8, 2.5))
image.SetOrigin((-38.4, -38.4, -60.0))
sitk.WriteImage(image, str(SAMPLE_FILE), useCompression=True)
print(SAMPLE_FILE, hashlib.sha256(SAMPLE_FILE.read_bytes()).hexdigest())
