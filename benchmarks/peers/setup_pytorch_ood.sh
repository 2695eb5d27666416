#!/usr/bin/env bash
# Create a separate venv for the pytorch-ood peer benchmark (pytorch_ood_run.py, driven by
# benchmarks/ood_detectors.py).
#
# pytorch-ood 0.4.0 asks only for torch>=1.7, torchvision>=0.12, scipy, numpy>=1.23 and
# typing_extensions, so it resolves beside the torch 2.14.1 / torchvision 0.29.1 that this
# machine's pip serves; it gets its own venv anyway so that its torch (and whatever it pulls)
# never touches the project's. scikit-learn is installed for pytorch-ood's own metrics module
# (its "all" extra; the benchmark scores with bob's metric code in the parent) and psutil for
# process figures. Rerunnable: a venv that already imports pytorch_ood is left alone.
#
# Usage: benchmarks/peers/setup_pytorch_ood.sh [VENV]   (default: .venv-pytorch-ood)
set -euo pipefail

VENV="${1:-.venv-pytorch-ood}"
PYTHON="${PYTHON:-python3}"
PYTORCH_OOD="${PYTORCH_OOD:-0.4.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import pytorch_ood, torch" 2>/dev/null; then
    echo "pytorch-ood already importable in $VENV; nothing to do." >&2
    exit 0
fi

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1 "pytorch-ood==$PYTORCH_OOD" scikit-learn \
    psutil
"$VENV/bin/python" -c "
import numpy, pytorch_ood, scipy, torch
print('pytorch-ood', pytorch_ood.__version__, 'torch', torch.__version__,
      'numpy', numpy.__version__, 'scipy', scipy.__version__)
" >&2
