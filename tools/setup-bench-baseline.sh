#!/usr/bin/env bash
# Creates the benchmark-only venv .venv-bench (NOT the test venv .venv) with the pinned
# llama-cpp-python of bench/llamacpp-requirements.txt, for bench/llamacpp_baseline.py.
# PyPI ships llama-cpp-python for Linux as a source package only, so pip builds llama.cpp
# here with CMake, tuned for this CPU (GGML_NATIVE: -march=native, so AVX-512/VNNI where the
# CPU has them), CPU backend only, without curl, tools, tests or the multimodal library.
# Idempotent: does nothing when the venv already holds the build for the same
# requirements and CMake flags. Takes several minutes on 2 cores the first time.
# Usage: tools/setup-bench-baseline.sh [--force]
# Env: PARKWAY_BENCH_VENV (default .venv-bench), PARKWAY_BENCH_CMAKE_ARGS (extra CMake
#      flags, appended), PARKWAY_BENCH_JOBS (build jobs, default nproc),
#      PARKWAY_BENCH_NICE (nice level of the build, default 10).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
force=0
for a in "$@"; do
    case "$a" in
    --force) force=1 ;;
    *) echo "setup-bench-baseline: unknown option $a" >&2; exit 2 ;;
    esac
done

venv=${PARKWAY_BENCH_VENV:-$here/.venv-bench}
req=$here/bench/llamacpp-requirements.txt
cmake_args="-DGGML_NATIVE=ON -DGGML_CPU=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF"
cmake_args+=" -DGGML_METAL=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF"
cmake_args+=" -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
cmake_args+=" -DLLAVA_BUILD=OFF"
cmake_args+=" ${PARKWAY_BENCH_CMAKE_ARGS:-}"
jobs=${PARKWAY_BENCH_JOBS:-$(nproc)}
nice_level=${PARKWAY_BENCH_NICE:-10}

# Two stamps: the build (the pinned llama-cpp-python line, CMake flags, CPU flags) and the
# whole requirements file; a change in the other pins does not rebuild llama.cpp.
pin=$(grep -i '^llama[-_]cpp[-_]python==' "$req")
[ -n "$pin" ] || { echo "setup-bench-baseline: no llama-cpp-python pin in $req" >&2; exit 1; }
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -d' ' -f1)
build_want=$( (echo "$pin"; echo "$cmake_args"; echo "$cpu_flags") | sha256sum | cut -d' ' -f1)
req_want=$(sha256sum "$req" | cut -d' ' -f1)
build_stamp=$venv/.bench-build.sha256
req_stamp=$venv/.bench-requirements.sha256
if [ "$force" = 0 ] && [ -x "$venv/bin/python" ] &&
    [ "$(cat "$build_stamp" 2>/dev/null)" = "$build_want" ] &&
    [ "$(cat "$req_stamp" 2>/dev/null)" = "$req_want" ] &&
    "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "setup-bench-baseline: $venv is up to date" >&2
    exit 0
fi

for tool in cmake cc c++; do
    command -v "$tool" >/dev/null || {
        echo "setup-bench-baseline: $tool not found (tools/setup-deps.sh installs it)" >&2
        exit 1
    }
done

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-bench-baseline: creating venv $venv" >&2
    py=/usr/bin/python3
    [ -x "$py" ] || py=$(command -v python3)
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
fi

export CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" FORCE_CMAKE=1
if [ "$force" = 1 ] || [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_want" ] ||
    ! "$venv/bin/pip" show -q llama-cpp-python >/dev/null 2>&1; then
    echo "setup-bench-baseline: building $pin from source (CMAKE_ARGS=$cmake_args)" >&2
    rm -f "$build_stamp" "$req_stamp"
    # --no-binary: always build here for this CPU; --no-cache-dir: never reuse a wheel that
    # pip cached from a build with other flags.
    nice -n "$nice_level" "$venv/bin/pip" install --disable-pip-version-check --no-cache-dir \
        --no-binary llama-cpp-python --force-reinstall --no-deps "$pin"
    echo "$build_want" >"$build_stamp"
fi
# The other pins; llama-cpp-python is already there at the pinned version, so this builds
# nothing.
"$venv/bin/pip" install -q --disable-pip-version-check --no-binary llama-cpp-python -r "$req"
"$venv/bin/python" -c 'import llama_cpp; print("setup-bench-baseline: llama_cpp", llama_cpp.__version__)' >&2
echo "$req_want" >"$req_stamp"
