#!/usr/bin/env bash
# CI: compile the fused kernels for every listed GPU architecture with nvcc (no GPU needed),
# build the CPU test library, and check the C API symbols are exported.
# About 40 s on 2 cores (nvcc 13.0). The TensorRT plugins build only where TensorRT is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[ -x "$NVCC" ] || { echo "nvcc not found: install the CUDA toolkit or set NVCC=" >&2; exit 1; }
ARCHS="${EDGETOK_CUDA_ARCHS:-75;80;86;87;89;90}"
OUT="${1:-build/ci-plugins}"
cmake -S plugins -B "$OUT" -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
  -DEDGETOK_BUILD_TRT_PLUGIN=ON ${TENSORRT_ROOT:+-DTENSORRT_ROOT="$TENSORRT_ROOT"}
cmake --build "$OUT" -j "$(nproc)"
for sym in edgetok_token_merge edgetok_token_drop edgetok_threshold_merge edgetok_token_merge_workspace_size; do
  nm -D --defined-only "$OUT/libedgetok_kernels.so" | grep -qw "$sym" || { echo "missing C API symbol $sym" >&2; exit 1; }
done
# Every architecture must be in the fat binary (cuobjdump ships with the toolkit).
CUOBJDUMP="$(dirname "$NVCC")/cuobjdump"
if [ -x "$CUOBJDUMP" ]; then
  for a in ${ARCHS//;/ }; do
    "$CUOBJDUMP" --list-elf "$OUT/libedgetok_kernels.so" | grep -q "sm_$a" || { echo "no sm_$a code in the library" >&2; exit 1; }
  done
fi
echo "plugins built for sm_{${ARCHS//;/,}} in $OUT"
