#!/usr/bin/env bash
# Sets up .venv, then runs the main job end to end: a CT-like phantom volume (NIfTI) → a box on one slice →
# MedSAM2-architecture segmentation propagated through the volume by the `medsam2hitl` CLI (background worker,
# headless MRML), written as .seg.nrrd and a NIfTI labelmap, and scored against the phantom's true mask.
# Uses the project's own small trained checkpoint (Testing/Data/phantom_sam2.pt): MedSAM2 weights cannot be
# downloaded on every machine. With them: --checkpoint MedSAM2_latest (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-demo-output}
mkdir -p "$out"
box=$(.venv/bin/python - "$out" <<'PY'
import sys
import nibabel as nib
import numpy as np
sys.path.insert(0, "Testing/Training")
from phantoms import make_phantom

out = sys.argv[1]
phantom = make_phantom(2026, size=(60, 128, 128), modality="ct")  # a target among distractor objects
affine = np.diag([0.8, 0.8, 2.5, 1.0])  # 0.8 mm in-plane, 2.5 mm slices
nib.save(nib.Nifti1Image(phantom.volume.transpose(2, 1, 0), affine), f"{out}/phantom_ct.nii.gz")
nib.save(nib.Nifti1Image(phantom.mask.transpose(2, 1, 0).astype(np.uint8), affine), f"{out}/phantom_truth.nii.gz")
x0, y0, x1, y1 = phantom.box()
k = phantom.key_index
corners = affine @ np.array([[x0 - 2, y0 - 2, k, 1], [x1 + 2, y1 + 2, k, 1]], float).T
print(" ".join(f"{v:.2f}" for v in (*corners[:3, 0], *corners[:3, 1])))
PY
)
.venv/bin/medsam2hitl info "$out/phantom_ct.nii.gz"
.venv/bin/medsam2hitl segment "$out/phantom_ct.nii.gz" --box-ras $box --window abdomen --propagate \
    --checkpoint Testing/Data/phantom_sam2.pt --device auto -o "$out/phantom.seg.nrrd" --labelmap "$out/phantom_labels.nii.gz"
.venv/bin/python - "$out" <<'PY'
import sys
import nibabel as nib
import numpy as np

out = sys.argv[1]
found = np.asarray(nib.load(f"{out}/phantom_labels.nii.gz").dataobj) > 0
truth = np.asarray(nib.load(f"{out}/phantom_truth.nii.gz").dataobj) > 0
print(f"3D Dice against the phantom's true mask: {2 * (found & truth).sum() / (found.sum() + truth.sum()):.3f}")
PY
