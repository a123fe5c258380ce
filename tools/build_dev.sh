#!/usr/bin/env bash
# Builds the onnx_nf4 custom-op library into build/dev (Release), where onnx_nf4.custom_op_library() finds it
# in a source checkout. Extra arguments go to the CMake configure step, e.g.
#   tools/build_dev.sh -DONNXRUNTIME_INCLUDE_DIR=/opt/onnxruntime/include
# Needs cmake >= 3.21 and a C++17 compiler; uses Ninja when it is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${root}/build/dev"
generator=()
if [[ ! -f "${build}/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
cmake -S "${root}/custom_ops" -B "${build}" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "${build}" --parallel
echo "built: $(ls "${build}"/*onnx_nf4_ops.* 2>/dev/null | head -1)"
