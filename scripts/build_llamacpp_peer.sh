#!/usr/bin/env bash
# Build the llama.cpp peer (llama-cpp-python) from source for THIS CPU, into .venv, and record how.
#
# -DGGML_NATIVE=ON compiles ggml for the CPU it runs on (AVX2 / AVX-512 / VNNI / BF16 / AMX). On a CPU with
# AMX and GCC 12, ggml's AMX kernels crash in ldtilecfg (GCC 12's _tile_loadconfig declares an 8-byte memory
# operand, so the rest of the 64-byte tile config can be dropped): scripts/peer/amxfix.h redefines it and is
# force-included then. The flags used are written to .venv/quantchat-peer-build.json, which
# `quantchat bench --peer llama.cpp` puts in its report. About 4-9 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
FLAGS="-DGGML_NATIVE=ON"
EXTRA=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null && ${CC:-gcc} --version 2>/dev/null | head -1 | grep -q " 12\."; then
    FIX="$(pwd)/scripts/peer/amxfix.h"
    EXTRA="-include $FIX"
    FLAGS="$FLAGS -DCMAKE_C_FLAGS='$EXTRA' -DCMAKE_CXX_FLAGS='$EXTRA'"
fi
echo "building llama-cpp-python $VERSION with CMAKE_ARGS=$FLAGS"
CMAKE_ARGS="$FLAGS" FORCE_CMAKE=1 "$PY" -m pip install --disable-pip-version-check -q --no-cache-dir \
    --no-binary llama-cpp-python --force-reinstall --no-deps "llama-cpp-python==$VERSION"
"$PY" -m pip install --disable-pip-version-check -q "llama-cpp-python==$VERSION"   # its pure-Python deps
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
"$PY" - "$VERSION" "$FLAGS" "$CPU" <<'PYEOF'
import json, sys, sysconfig, pathlib
import llama_cpp
info = {"package": "llama-cpp-python", "version": sys.argv[1], "cmake_args": sys.argv[2], "cpu": sys.argv[3],
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
out = pathlib.Path(sys.prefix) / "quantchat-peer-build.json"
out.write_text(json.dumps(info, indent=2) + "\n")
print(f"built: {info['system_info']}\nrecorded in {out}")
PYEOF
