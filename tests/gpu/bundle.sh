#!/usr/bin/env bash
# tests/gpu/bundle.sh [ARCH]: builds the device check's binaries HERE (Release, CUDA for
# sm_ARCH, default 90a) and copies them, with the shared libraries they need that a bare
# GPU image may lack, into build-gpu-bundle/ (bin/, lib/, ARCH). check.sh uses the bundle
# when PW_GPU_PREBUILT=build-gpu-bundle and every binary resolves its libraries there,
# which saves the device the minutes of the build. glibc, libstdc++, the CUDA driver and
# cuBLAS are the device's own (the bundle must not carry them: cuBLAS is hundreds of MB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ARCH="${1:-90a}"
B="$ROOT/build-gpu"
OUT="$ROOT/build-gpu-bundle"
cmake -S "$ROOT" -B "$B" -DCMAKE_BUILD_TYPE=Release -DPW_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >/dev/null
cmake --build "$B" -j "$(nproc)" --target test_cuda_ops bench_gpu parkway-gguf-gen >/dev/null
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib"
cp "$B/tests/test_cuda_ops" "$B/bench/bench_gpu" "$B/tools/gguf-gen/parkway-gguf-gen" "$OUT/bin/"
for f in "$OUT"/bin/*; do
    ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
    libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | ld-linux* | libstdc++.so* | \
        libgcc_s.so* | libcuda.so* | libcublas*.so*) ;;
    *) cp -L "$lib" "$OUT/lib/" ;;
    esac
done
echo "sm_$ARCH built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -n)" >"$OUT/ARCH"
du -sh "$OUT"
ls "$OUT/lib"
