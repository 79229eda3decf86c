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
# the test extra and the demo extra (Gradio, for `perceptio demo` and its browser test)
"$PY" -m pip install -q -e ".[test,demo]"
if ! "$PY" -c "import sam2" >/dev/null 2>&1; then
  SAM2_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation "sam2==1.1.0"
fi
# Headless Chromium for the UI tests (tests/server/test_ui_browser.py, test_demo_browser.py): Debian's package, only in
# CI (CI=true, as CI runners set it for .ci/run) or when asked (PERCEPTIO_INSTALL_BROWSER=1), and only as root
# with apt-get; a developer machine is never touched otherwise (the test then skips, outside CI).
if [ "${CI:-}" = "true" ] || [ "${PERCEPTIO_INSTALL_BROWSER:-}" = "1" ]; then
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    :
  elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "perceptio: chromium is missing and cannot be installed here (needs root and apt-get);" \
         "install it, or set PERCEPTIO_CHROMIUM to a Chromium/Chrome binary" >&2
  fi
fi
"$PY" - <<'PY'
import importlib, sys
for m in ("torch", "transformers", "peft", "accelerate", "prefect", "webdataset", "pyarrow",
          "pycocotools", "sam2.modeling.sam.mask_decoder", "torch.utils.tensorboard", "gradio"):
    importlib.import_module(m)
assert "torchvision" not in sys.modules, "torchvision must not be imported"
print("perceptio: environment ready")
PY
