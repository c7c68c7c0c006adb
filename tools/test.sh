#!/usr/bin/env bash
# Runs every test this machine can run, after `pip install -e '.[test]'`:
#   1. pytest over python_tests/ (gpu-marked tests skip without a GPU); extra arguments go to pytest;
#   2. the GoogleTest suite in cpp_tests/ through ctest (Debian's libgtest-dev; installed here when root);
#   3. when nvcc exists, a check that the install above compiled the CUDA kernels, CUTLASS's tensor-core GEMMs
#      among them, into k2._C (a build that lost CUTLASS would otherwise pass with bf16 on CUDA cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v nvcc >/dev/null 2>&1; then
    python - <<'EOF'
import sys

import k2._C as C

b = C.build_info()
if not b["cuda"]:
    sys.exit("tools/test.sh: nvcc exists but k2._C has no CUDA kernels (rebuild with K2_CUDA=ON)")
if not b.get("cutlass"):
    sys.exit("tools/test.sh: nvcc exists but k2._C has no CUTLASS kernels (install nvidia-cutlass or set "
             "K2_CUTLASS_DIR, and rebuild with K2_CUDA=ON)")
print("CUDA kernels (CUTLASS included) compiled for", b["cuda_architectures"])
EOF
fi

if [ ! -e /usr/include/gtest/gtest.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libgtest-dev) >/dev/null
fi
[ -e /usr/include/gtest/gtest.h ] || { echo "tools/test.sh: GoogleTest not found: install Debian's libgtest-dev" >&2; exit 1; }
cmake -S . -B build/cpp-tests -DK2_BUILD_TESTS=ON -DK2_CUDA=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cpp-tests -j "$(nproc)"
ctest --test-dir build/cpp-tests --output-on-failure

python -m pytest python_tests "$@"
