#!/usr/bin/env bash
# Create a separate venv for the thingsvision peer benchmark (thingsvision_extract.py).
#
# thingsvision 2.7.3 pins old torchvision, numpy<2 and TensorFlow, so it does not resolve
# beside current torch. Its runtime dependencies are installed explicitly here and
# thingsvision itself with --no-deps. About 2 minutes and ~7.7 GB.
#
# Usage: benchmarks/peers/setup_thingsvision.sh [VENV]   (default: .venv-thingsvision)
set -euo pipefail

VENV="${1:-.venv-thingsvision}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import thingsvision" 2>/dev/null; then
    echo "thingsvision already importable in $VENV; nothing to do." >&2
    exit 0
fi

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1 'numpy<2' 'tensorflow<2.16' timm ftfy \
    h5py matplotlib numba 'open-clip-torch==3.*' pandas regex 'safetensors<0.6' scikit-image \
    scikit-learn scipy torchtyping tqdm psutil
"${PIP[@]}" install --no-deps thingsvision==2.7.3
"$VENV/bin/python" -c "import thingsvision; print('thingsvision', thingsvision.__version__)" >&2
