#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and the project installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" -r requirements/torch.txt
"${pip[@]}" -c requirements/torch.txt -r requirements/base.txt
SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps --no-build-isolation -r requirements/sam2.txt
"${pip[@]}" -c requirements/torch.txt -r requirements/server.txt
"${pip[@]}" -c requirements/torch.txt -r requirements/web.txt
"${pip[@]}" -c requirements/torch.txt --no-deps --no-build-isolation -e . -e Server
.venv/bin/python -c "import torch, sam2, MedSAM2HITLLib, medsam2hitl_server; print('torch', torch.__version__, '| sam2 ok | MedSAM2HITLLib', MedSAM2HITLLib.__version__, '| server', medsam2hitl_server.__version__)"
