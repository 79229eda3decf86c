#!/usr/bin/env bash
# Install Perceptio and everything it needs into the current Python environment (a venv if active).
#  - torch: the CPU build 2.13.0 unless a torch is already installed (clusters install their CUDA
#    build first; any torch in [2.5, 3) works).
#  - sam2: installed WITHOUT its dependencies and without build isolation: its metadata pins
#    torchvision, which we never import (and which drags GBs of CUDA packages); its real runtime
#    needs (hydra-core, iopath) are in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
if ! "$PY" -c "import sam2" >/dev/null 2>&1; then
  SAM2_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation "sam2==1.1.0"
fi
"$PY" - <<'PY'
import importlib, sys
for m in ("torch", "transformers", "peft", "accelerate", "prefect", "webdataset", "pyarrow",
          "pycocotools", "sam2.modeling.sam.mask_decoder"):
    importlib.import_module(m)
assert "torchvision" not in sys.modules, "torchvision must not be imported"
print("perceptio: environment ready")
PY
