#!/usr/bin/env bash
# Builds .whl/site312.txz: the packages the GPU image lacks (pyzmq, fastapi & co, uvicorn, prometheus-client,
# hypothesis, ucxx and its UCX/RMM libraries, xgrammar for structured outputs), for its Python 3.12, trimmed of static libraries, headers and UCX's
# perftest (the device call carries at most 64 MiB). On the device: mkdir -p /tmp/site && tar xf .whl/site312.txz -C /tmp/site.
# Also .whl/py-spy, the sampling profiler gpu_lockstep.sh PROFILE=1 runs on the node processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DL=$(mktemp -d) SITE=$(mktemp -d)
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
ARGS="--only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS"
$PIP download -q --no-deps $ARGS -d "$DL" pyzmq fastapi starlette pydantic pydantic-core annotated-types \
  typing-inspection uvicorn httptools opentelemetry-api prometheus-client hypothesis sortedcontainers ucxx-cu13==0.52.* \
  libucxx-cu13==0.52.* 'libucx-cu13<1.22' \
  rmm-cu13==26.10.* librmm-cu13==26.10.* rapids-logger==0.3.* xgrammar==0.2.9 apache-tvm-ffi
$PIP install -q --no-deps --no-compile $ARGS --target "$SITE" "$DL"/*.whl
cd "$SITE"
find . -name '*.a' -delete
rm -rf libucx/bin libucx/include libucx/lib/ucx/libucx_perftest* librmm/include libucxx/include bin
for f in $(find . -name '*.so.*'); do  # wheels hold copies where the libraries had symlinks
  base=$(echo "$f" | sed -E 's/\.so\..*/.so/')
  if [ -f "$base" ] && cmp -s "$base" "$f"; then ln -sf "$(basename "$base")" "$f"; fi
done
cd - >/dev/null
mkdir -p .whl && tar cJf .whl/site312.txz -C "$SITE" .
rm -rf "$DL" "$SITE"
# py-spy for gpu_lockstep.sh's PROFILE=1: its binary alone (a wheel of one static executable, no Python package)
DL=$(mktemp -d)
$PIP download -q --no-deps $ARGS -d "$DL" py-spy==0.4.3
python3 -m zipfile -e "$DL"/py_spy-*.whl "$DL/x" && install -m 755 "$DL"/x/py_spy-*.data/scripts/py-spy .whl/py-spy
rm -rf "$DL"
ls -la .whl/site312.txz .whl/py-spy
