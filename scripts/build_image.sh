#!/usr/bin/env bash
# Build the quantchat image (deploy/Dockerfile) with podman, buildah or docker, on a machine with or
# without an image registry.
#
#   scripts/build_image.sh                       # the base: python:3.11-slim-bookworm from a registry
#   scripts/build_image.sh --offline             # no registry: the base made here with mmdebstrap
#   scripts/build_image.sh --base IMAGE --tag quantchat:0.1.0 --engine buildah
#   scripts/build_image.sh --offline --isolation chroot   # where containers cannot run (no cgroups for
#                                                         # crun/runc: a sandbox, a container itself)
#
# Steps: (1) the locked wheels (deploy/requirements.lock, sha256-pinned, torch's CPU build) are
# downloaded with this machine's pip into build/image-wheels, so the image build itself needs no Python
# index; (2) --offline: `mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates
# bookworm` makes build/base.tar (needs a Debian mirror, no registry), imported as localhost/quantchat-base;
# (3) the image is built with --build-arg BASE=<base>. Re-lock after changing dependencies:
# python3 scripts/lock_image_requirements.py.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=quantchat:0.1.0
BASE=python:3.11-slim-bookworm
OFFLINE=0
ENGINE=""
ISOLATION=""
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
while [ $# -gt 0 ]; do
    case "$1" in
        --offline) OFFLINE=1 ;;
        --base) BASE=$2; shift ;;
        --tag) TAG=$2; shift ;;
        --engine) ENGINE=$2; shift ;;
        --isolation) ISOLATION=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build_image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$ENGINE" ]; then
    for e in podman buildah docker; do
        if command -v "$e" >/dev/null; then ENGINE=$e; break; fi
    done
fi
[ -n "$ENGINE" ] || { echo "build_image.sh: no podman, buildah or docker found (apt-get install podman buildah)" >&2; exit 1; }

echo "[1/3] locked wheels -> build/image-wheels"
mkdir -p build/image-wheels
"$PYTHON" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    -r deploy/requirements.lock -d build/image-wheels

if [ "$OFFLINE" = 1 ]; then
    echo "[2/3] base image: mmdebstrap bookworm -> build/base.tar -> localhost/quantchat-base"
    command -v mmdebstrap >/dev/null || { echo "build_image.sh: --offline needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }
    [ "$ENGINE" != docker ] || { echo "build_image.sh: --offline imports the base with podman (or buildah)" >&2; exit 1; }
    if [ ! -s build/base.tar ]; then
        mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm build/base.tar.tmp
        mv build/base.tar.tmp build/base.tar
    fi
    command -v podman >/dev/null || { echo "build_image.sh: --offline imports the base with podman import" >&2; exit 1; }
    podman import build/base.tar localhost/quantchat-base:bookworm
    BASE=localhost/quantchat-base:bookworm
else
    echo "[2/3] base image: $BASE"
fi

echo "[3/3] $ENGINE build -> $TAG"
ISO=()
if [ -n "$ISOLATION" ]; then
    [ "$ENGINE" != docker ] || { echo "build_image.sh: --isolation is a podman/buildah option" >&2; exit 2; }
    ISO=(--isolation "$ISOLATION")
fi
case "$ENGINE" in
    buildah) buildah bud --layers --format docker "${ISO[@]}" -f deploy/Dockerfile --build-arg "BASE=$BASE" -t "$TAG" . ;;
    podman) podman build --format docker "${ISO[@]}" -f deploy/Dockerfile --build-arg "BASE=$BASE" -t "$TAG" . ;;
    *) "$ENGINE" build "${ISO[@]}" -f deploy/Dockerfile --build-arg "BASE=$BASE" -t "$TAG" . ;;
esac
echo "built $TAG (base $BASE)"
