#!/usr/bin/env bash
# Create a separate venv for the autofaiss peer benchmark (autofaiss_run.py).
#
# autofaiss 2.18.0 requires numpy<2, so it cannot share the project's venv. Two pins are needed
# beside it:
#   * pyarrow<26: autofaiss -> embedding-reader imports pyarrow.parquet, and pyarrow 26 refuses to
#     import under numpy 1.x ("pyarrow requires NumPy 2.0 or newer").
#   * faiss-cpu: autofaiss only asks for faiss-cpu<2. The wheels are built against numpy 2 but still
#     import and run under numpy 1.26, so the default pin is the same faiss as the project's venv
#     (1.15.1), which keeps faiss itself out of the comparison. FAISS_CPU=1.8.0.post1 (or any
#     other version) overrides it; 1.8.0.post1 through 1.15.1 were checked to import.
# About 40 seconds and ~420 MB.
#
# Usage: benchmarks/peers/setup_autofaiss.sh [VENV]   (default: .venv-autofaiss)
set -euo pipefail

VENV="${1:-.venv-autofaiss}"
PYTHON="${PYTHON:-python3}"
FAISS_CPU="${FAISS_CPU:-1.15.1}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import autofaiss, faiss" 2>/dev/null; then
    echo "autofaiss already importable in $VENV; nothing to do." >&2
    exit 0
fi

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install autofaiss==2.18.0 "faiss-cpu==$FAISS_CPU" 'numpy<2' 'pyarrow<26' psutil
"$VENV/bin/python" -c "
import autofaiss, faiss, numpy
print('autofaiss', autofaiss.__version__, 'faiss', faiss.__version__, 'numpy', numpy.__version__)
" >&2
