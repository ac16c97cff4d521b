#!/usr/bin/env bash
# tests/gpu/check.sh: the one device check of the CUDA backend, for a GPU machine with no
# network (docs/internals/cuda.md). Run from anywhere: bash tests/gpu/check.sh
#
#   1. builds Release with CUDA for this GPU's architecture (the CMake build; when the
#      system libraries the full tree needs are missing, a minimal nvcc/gcc build of just
#      the kernels, the engine's model code, the generator and bench_gpu);
#   2. runs the cuda-labelled tests (test_cuda_ops: every op against the CPU backend);
#   3. generates random-weight models with parkway-gguf-gen (SmolLM2-135M, Llama-3.2-1B and
#      Llama-3-8B shapes, F16 and Q8_0/Q4_0; the 8B shape with 4 of its 32 layers so it
#      fits the time) and compares CUDA logits with CPU logits (bench_gpu compare: max
#      relative error, top-1 agreement over teacher-forced greedy steps), and with
#      PyTorch/transformers when they are installed (tests/gpu/hf_compare.py);
#   4. benchmarks decode at batch 1/8/32/64 and a 2048-token prefill (bench_gpu bench) as
#      fractions of the measured copy bandwidth and cuBLAS BF16 GEMM rate;
#   5. prints ONE summary table last. Exit status 0 when every check that ran passed.
#
# Everything stays under $PW_GPU_WORK (default: build-gpu-check/ in the repo). The whole
# run is budgeted to 8 minutes (PW_GPU_BUDGET_S, default 470 s): later stages are skipped,
# and say so, when the remaining time is too short. PW_GPU_BUILD=min skips the CMake build.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${PW_GPU_WORK:-$ROOT/build-gpu-check}"
BUDGET="${PW_GPU_BUDGET_S:-470}"
START=$SECONDS
JOBS="$(nproc 2>/dev/null || echo 8)"
mkdir -p "$WORK/models" "$WORK/logs" "$WORK/out"
SUMMARY=()
PROFILES=()
FAILED=0

log() { printf '[check %3ds] %s\n' "$((SECONDS - START))" "$*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
row() { SUMMARY+=("$(printf '%-9s | %-28s | %-6s | %s' "$1" "$2" "$3" "$4")"); }
fail_row() {
    row "$1" "$2" "FAIL" "$3"
    FAILED=1
}
# run_to SECONDS LOGFILE CMD...: runs CMD with a timeout capped by the time left.
run_to() {
    local want=$1 logf=$2
    shift 2
    local l
    l=$(left)
    ((l < 5)) && return 124
    ((want > l)) && want=$l
    timeout --kill-after=5 "$want" "$@" >"$logf" 2>&1
}

print_summary() {
    local f
    for f in "${PROFILES[@]}"; do
        echo
        echo "== $(basename "$f" .log)"
        grep -E '^(profile|  )' "$f"
    done
    echo
    echo "==================== parkway GPU check summary ===================="
    echo "device: ${GPU_NAME:-unknown} (cc ${GPU_CC:-?}), $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s"
    printf '%-9s | %-28s | %-6s | %s\n' "stage" "what" "result" "detail"
    echo "----------+------------------------------+--------+-------------------------------"
    local r
    for r in "${SUMMARY[@]}"; do
        echo "$r"
    done
    echo "===================================================================="
}
trap print_summary EXIT

# ---- 0. the device ----
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    fail_row device "nvidia-smi" "no GPU visible"
    exit 1
fi
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
GPU_CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')"
case "$GPU_CC" in
9.0) ARCH=90a ;;
*.*) ARCH="${GPU_CC/./}" ;;
*) ARCH=80 ;;
esac
row device "$GPU_NAME" "ok" "cc $GPU_CC, building sm_$ARCH"
log "device $GPU_NAME cc=$GPU_CC arch=$ARCH jobs=$JOBS"
export PATH="$PATH:/usr/local/cuda/bin"

# ---- 1. build ----
B="$WORK/build"
BIN_GEN="" BIN_BENCH="" BIN_TEST=""
build_cmake() {
    run_to 60 "$WORK/logs/configure.log" cmake -S "$ROOT" -B "$B" -DCMAKE_BUILD_TYPE=Release \
        -DPW_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" || return 1
    run_to 240 "$WORK/logs/build.log" cmake --build "$B" -j "$JOBS" --target test_cuda_ops \
        bench_gpu parkway-gguf-gen || return 1
    BIN_GEN="$B/tools/gguf-gen/parkway-gguf-gen"
    BIN_BENCH="$B/bench/bench_gpu"
    BIN_TEST="$B/tests/test_cuda_ops"
}
# The minimal build: no libevent/hiredis/yaml/... needed, only a C compiler and CUDA.
build_min() {
    local M="$WORK/build-min" S="$ROOT"
    mkdir -p "$M"
    local CF=(-std=c11 -O2 -D_GNU_SOURCE -DPW_HAVE_CUDA=1 "-I$S/runtime" "-I$S/kernels"
        "-I$S/kernels/cuda" "-I$S/engine" "-I$S/tools/gguf-gen" -I/usr/local/cuda/include)
    local pids=() f o fl
    for f in "$S"/runtime/pw_err.c "$S"/runtime/pw_log.c "$S"/runtime/pw_clock.c \
        "$S"/kernels/cpu/*.c "$S"/engine/engine_model.c "$S"/engine/engine_gguf.c \
        "$S"/tools/gguf-gen/gguf_gen.c "$S"/tools/gguf-gen/gguf_writer.c "$S"/bench/bench_gpu.c; do
        o="$M/c_$(basename "$f" .c).o"
        case "$f" in
        *avx512*) fl="-mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c" ;;
        *avx2*) fl="-mavx2 -mfma -mf16c" ;;
        *) fl="" ;;
        esac
        # shellcheck disable=SC2086 # fl is a list of flags
        gcc "${CF[@]}" $fl -c "$f" -o "$o" &
        pids+=($!)
    done
    for f in "$S"/kernels/cuda/*.cu; do
        nvcc -std=c++17 -O3 -arch="sm_$ARCH" --expt-relaxed-constexpr -I"$S/runtime" \
            -I"$S/kernels" -I"$S/kernels/cuda" -c "$f" -o "$M/cu_$(basename "$f" .cu).o" &
        pids+=($!)
    done
    local ok=1
    for p in "${pids[@]}"; do wait "$p" || ok=0; done
    ((ok)) || return 1
    gcc "${CF[@]}" -c "$S/tools/gguf-gen/main.c" -o "$M/gen_main.o" || return 1
    local common=("$M"/c_pw_*.o "$M"/c_kernel_*.o)
    nvcc -o "$M/bench_gpu" "$M/c_bench_gpu.o" "${common[@]}" "$M"/c_engine_*.o "$M"/cu_*.o \
        -lcublas -lpthread -lm || return 1
    nvcc -o "$M/parkway-gguf-gen" "$M/gen_main.o" "$M"/c_gguf_*.o "${common[@]}" "$M"/cu_*.o \
        -lcublas -lpthread -lm || return 1
    if [ -f /usr/include/cmocka.h ]; then
        gcc "${CF[@]}" -c "$S/tests/cuda/test_cuda_ops.c" -o "$M/test_cuda_ops.o" &&
            nvcc -o "$M/test_cuda_ops" "$M/test_cuda_ops.o" "${common[@]}" "$M"/cu_*.o \
                -lcublas -lcmocka -lpthread -lm && BIN_TEST="$M/test_cuda_ops"
    fi
    BIN_GEN="$M/parkway-gguf-gen"
    BIN_BENCH="$M/bench_gpu"
}
# Binaries built elsewhere (tests/gpu/bundle.sh): used when they start here, which saves
# the build's minutes of device time; a bundle that cannot run falls back to building.
use_prebuilt() {
    local P="${PW_GPU_PREBUILT:-}"
    [ -n "$P" ] && [ -x "$P/bin/bench_gpu" ] || return 1
    export LD_LIBRARY_PATH="$P/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local f
    for f in bench_gpu parkway-gguf-gen test_cuda_ops; do
        if ! ldd "$P/bin/$f" >"$WORK/logs/ldd-$f.log" 2>&1 ||
            grep -q 'not found' "$WORK/logs/ldd-$f.log"; then
            log "prebuilt $f cannot start here:"
            grep 'not found' "$WORK/logs/ldd-$f.log"
            return 1
        fi
    done
    BIN_GEN="$P/bin/parkway-gguf-gen"
    BIN_BENCH="$P/bin/bench_gpu"
    BIN_TEST="$P/bin/test_cuda_ops"
}
log "building (logs in $WORK/logs)"
if use_prebuilt; then
    row build "prebuilt $(cat "$PW_GPU_PREBUILT/ARCH" 2>/dev/null)" "ok" "$PW_GPU_PREBUILT"
elif [ "${PW_GPU_BUILD:-auto}" != min ] && build_cmake; then
    row build "cmake Release sm_$ARCH" "ok" "$((SECONDS - START)) s"
else
    if [ "${PW_GPU_BUILD:-auto}" != min ]; then
        log "cmake build failed (tail of its log below); trying the minimal build"
        tail -5 "$WORK/logs/configure.log" "$WORK/logs/build.log" 2>/dev/null
    fi
    if build_min >"$WORK/logs/build-min.log" 2>&1; then
        row build "minimal nvcc/gcc sm_$ARCH" "ok" "$((SECONDS - START)) s (no CMake build)"
    else
        tail -20 "$WORK/logs/build-min.log"
        fail_row build "cmake and minimal" "see $WORK/logs"
        exit 1
    fi
fi

# ---- models, generated in the background while the tests run (one process each) ----
# name shape type extra-args compare-steps
MODELS=(
    "smollm2-f16 smollm2-135m f16 - 63"
    "llama8b-l4-f16 llama-3-8b f16 --n-layer=4 15"
    "llama1b-f16 llama-3.2-1b f16 - 31"
    "smollm2-q4_0 smollm2-135m q4_0 - 63"
    "smollm2-q8_0 smollm2-135m q8_0 - 63"
    "llama1b-q4_0 llama-3.2-1b q4_0 - 31"
    "llama8b-l4-q4_0 llama-3-8b q4_0 --n-layer=4 15"
)
declare -A GENPID
gen_args() { # name shape type extra -> the generator's arguments
    local a=(--out "$WORK/models/$1.gguf" --shape "$2" --type "$3" --seed 7)
    [ "$4" != "-" ] && a+=("${4%%=*}" "${4#*=}")
    echo "${a[@]}"
}
for spec in "${MODELS[@]}"; do
    read -r name shape type extra steps <<<"$spec"
    [ -s "$WORK/models/$name.gguf" ] && continue
    # shellcheck disable=SC2046 # the arguments hold no spaces
    run_to 150 "$WORK/logs/gen-$name.log" "$BIN_GEN" $(gen_args "$name" "$shape" "$type" "$extra") &
    GENPID[$name]=$!
done
log "generating ${#GENPID[@]} models in the background"

# ---- 2. cuda tests ----
log "cuda tests"
if [ -f "$B/CTestTestfile.cmake" ] && [ "$BIN_TEST" = "$B/tests/test_cuda_ops" ]; then
    run_to 150 "$WORK/logs/ctest.log" ctest --test-dir "$B" -L cuda --output-on-failure
    rc=$?
else
    if [ -n "$BIN_TEST" ]; then
        run_to 150 "$WORK/logs/ctest.log" "$BIN_TEST"
        rc=$?
    else
        rc=-1
    fi
fi
# ctest counts a skipped test (exit 77: no device seen) as passed; here it is a failure.
if [ "$rc" = 0 ] && grep -q '(Skipped)' "$WORK/logs/ctest.log"; then
    rc=77
fi
case $rc in
0) row test "cuda tests" "ok" "$(grep -Eo '[0-9]+% tests passed.*|PASSED.*' "$WORK/logs/ctest.log" | head -1)" ;;
-1) row test "test_cuda_ops" "skip" "not built (no cmocka)" ;;
77) fail_row test "ctest -L cuda" "skipped: the test saw no CUDA device" ;;
*)
    fail_row test "ctest -L cuda" "rc=$rc, see logs/ctest.log"
    grep -E 'FAILED|cuda=|Assert|error' "$WORK/logs/ctest.log" | head -10
    ;;
esac

# ---- 3. models and correctness ----
declare -A MPATH
for spec in "${MODELS[@]}"; do
    read -r name shape type extra steps <<<"$spec"
    if (($(left) < 150)); then
        row model "$name" "skip" "out of time"
        continue
    fi
    f="$WORK/models/$name.gguf"
    if [ -n "${GENPID[$name]:-}" ] && ! wait "${GENPID[$name]}"; then
        rm -f "$f"
        fail_row model "$name" "parkway-gguf-gen failed: logs/gen-$name.log"
        continue
    fi
    MPATH[$name]="$f"
    log "compare $name (CPU vs CUDA, $((steps + 1)) steps)"
    # a 160-token prompt: its prefill takes the cuBLAS attention path (runs of >= 128 rows)
    run_to 90 "$WORK/logs/compare-$name.log" "$BIN_BENCH" compare "$f" --prompt 160 \
        --steps "$steps" --dump "$WORK/out/$name"
    rc=$?
    line="$(grep '^compare:' "$WORK/logs/compare-$name.log" | head -1)"
    if [ $rc -eq 0 ]; then
        row compare "$name vs cpu" "ok" "${line#compare: }"
    elif [ $rc -eq 124 ]; then
        row compare "$name vs cpu" "skip" "timed out"
    else
        fail_row compare "$name vs cpu" "${line:-rc=$rc, see logs/compare-$name.log}"
    fi
done

if command -v python3 >/dev/null && python3 -c 'import torch, transformers, numpy' 2>/dev/null; then
    for name in smollm2-f16 llama1b-f16; do
        if [ -z "${MPATH[$name]:-}" ] || [ ! -s "$WORK/out/$name.f32" ]; then
            continue
        fi
        if (($(left) < 120)); then
            row hf "$name" "skip" "out of time"
            continue
        fi
        log "transformers $name"
        run_to 100 "$WORK/logs/hf-$name.log" python3 "$ROOT/tests/gpu/hf_compare.py" \
            "${MPATH[$name]}" "$WORK/out/$name"
        rc=$?
        line="$(grep '^hf_compare:' "$WORK/logs/hf-$name.log" | head -1)"
        if [ $rc -eq 0 ]; then
            row hf "$name vs transformers" "ok" "${line#hf_compare: }"
        else
            fail_row hf "$name vs transformers" "${line:-rc=$rc, see logs/hf-$name.log}"
        fi
    done
else
    row hf "transformers" "skip" "torch/transformers not importable"
fi

# ---- 4. speed ----
for name in llama8b-l4-f16 llama1b-f16 smollm2-f16 llama8b-l4-q4_0 llama1b-q4_0 smollm2-q4_0; do
    [ -n "${MPATH[$name]:-}" ] || continue
    if (($(left) < 45)); then
        row bench "$name" "skip" "out of time"
        continue
    fi
    log "bench $name"
    run_to 75 "$WORK/logs/bench-$name.log" "$BIN_BENCH" bench "${MPATH[$name]}" \
        --batches 1,8,32,64 --ctx 512 --prefill 2048 --reps 20
    rc=$?
    if [ $rc -ne 0 ]; then
        fail_row bench "$name" "rc=$rc, see logs/bench-$name.log"
        continue
    fi
    dev="$(grep '^device:' "$WORK/logs/bench-$name.log" | head -1)"
    [ -n "$dev" ] && DEVLINE="$dev"
    while read -r l; do
        row bench "$name" "ok" "$l"
    done < <(grep -E '^(decode|prefill)' "$WORK/logs/bench-$name.log")
done
[ -n "${DEVLINE:-}" ] && row bench "device bounds" "ok" "${DEVLINE#device: }"
# what copying every logit row to the host (a host-side sampler) costs, for comparison
if [ -n "${MPATH[llama8b-l4-f16]:-}" ] && (($(left) >= 45)); then
    run_to 60 "$WORK/logs/bench-full-logits.log" "$BIN_BENCH" bench "${MPATH[llama8b-l4-f16]}" \
        --batches 1,64 --ctx 512 --prefill 0 --reps 20 --full-logits
    while read -r l; do
        row bench "llama8b-l4-f16 full" "ok" "$l"
    done < <(grep -E '^decode' "$WORK/logs/bench-full-logits.log")
fi

# ---- where the time goes (printed above the summary) ----
PROFILES=()
for spec in "llama8b-l4-f16 1,64 2048" "llama8b-l4-q4_0 1 0" "smollm2-f16 1 0"; do
    read -r name bs pf <<<"$spec"
    [ -n "${MPATH[$name]:-}" ] || continue
    (($(left) >= 60)) || break
    log "profile $name"
    if run_to 45 "$WORK/logs/profile-$name.log" "$BIN_BENCH" profile "${MPATH[$name]}" \
        --batches "$bs" --ctx 512 --prefill "$pf"; then
        PROFILES+=("$WORK/logs/profile-$name.log")
    else
        row profile "$name" "skip" "rc=$?, see logs/profile-$name.log"
    fi
done

# ---- 5. memory checker over the op tests, when there is time left ----
if [ -n "$BIN_TEST" ] && command -v compute-sanitizer >/dev/null 2>&1; then
    if (($(left) >= 90)); then
        log "compute-sanitizer memcheck test_cuda_ops"
        run_to 75 "$WORK/logs/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 9 \
            "$BIN_TEST"
        rc=$?
        summ="$(grep -E 'ERROR SUMMARY' "$WORK/logs/memcheck.log" | tail -1)"
        case $rc in
        0) row memcheck "test_cuda_ops" "ok" "${summ:-clean}" ;;
        124 | 137) row memcheck "test_cuda_ops" "skip" "timed out" ;;
        *) fail_row memcheck "test_cuda_ops" "rc=$rc ${summ}" ;;
        esac
    else
        row memcheck "test_cuda_ops" "skip" "out of time"
    fi
fi

exit $FAILED
