#!/usr/bin/env bash
# One command that verifies everything CUDA in k2 on a GPU machine, and a companion that gathers beforehand,
# on a machine with network, what the GPU machine lacks.
#
#   tools/gpu_check.sh --prepare DIR
#       Networked machine. Downloads the nvidia-cutlass wheel (the version installed here, else the newest
#       >= 4.0) and extracts only its C++ headers into DIR/cutlass/{include,tools/util/include} (~27 MB, with
#       CUTLASS's LICENSE.txt and DIR/MANIFEST.json); copy DIR to the GPU machine with the checkout (under
#       build/, git ignores it). Nothing else is needed: beyond k2 itself the check imports only torch, pytest,
#       numpy, safetensors and pybind11, and runs cmake, ninja and nvcc.
#
#   tools/gpu_check.sh OUTDIR [--from DIR]
#       GPU machine, no network needed. CUTLASS headers come from DIR/cutlass (--from DIR, or the environment
#       variable K2_GPU_CHECK_FROM), else from K2_CUTLASS_DIR, else from an installed nvidia-cutlass. Steps, each
#       with its log in OUTDIR and a line in OUTDIR/summary.json (command, rc, seconds, log, status):
#         build       cmake + ninja, K2_CUDA=ON, for this GPU's architecture only (compute capability 9.0 ->
#                     90a; 8.0 -> 80; other -> 80;<cc>), all cores; k2/_C*.so is copied into the source tree
#                     (git ignores it) and every later step imports k2 from the tree (PYTHONPATH; a k2
#                     installed into that Python, e.g. `pip install -e .`, would shadow it: uninstall it first)
#         build_info  k2._C is the module just built, with CUDA and CUTLASS for this architecture, and torch
#                     sees the GPU (OUTDIR/build_info.json)
#         test_*      every python_tests file with gpu-marked tests, each in its own pytest process (an illegal
#                     address in one cannot hide the others), and test_build.py; a gpu test skipped because
#                     there is "no CUDA device" or no CUDA build counts as a failure
#         bench_*     tools/bench_fp8.py, bench_moe.py, bench_ns.py, bench_optim.py with --device cuda, each
#                     writing OUTDIR/bench_*.json
#       The whole check keeps to K2_GPU_CHECK_BUDGET seconds (default 460, under 8 minutes on an H100/H200):
#       each step runs under `timeout`, and a step with no time left counts as failed. Exit status: 0 when every
#       step passed, 1 when any failed, 2 when the check could not start (no GPU, no CUTLASS, bad arguments).
#
# Environment: PYTHON (default python3), CMAKE_CUDA_ARCHITECTURES (overrides the detected architecture),
# K2_GPU_CHECK_BUDGET, CUDACXX (nvcc, default from PATH or /usr/local/cuda/bin).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python

die() {  # one-line message, exit 2: the check could not start
    echo "tools/gpu_check.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# ---- --prepare DIR ---------------------------------------------------------------------------------------------

prepare() {
    local dir=$1 tmp version
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("nvidia-cutlass"))' 2>/dev/null || true)
    local spec="nvidia-cutlass>=4.0"
    [ -n "$version" ] && spec="nvidia-cutlass==$version"
    echo "gpu_check --prepare: downloading $spec"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$spec" \
        || die "--prepare: pip could not download $spec (this step needs network access)"
    rm -rf "$dir/cutlass" "$dir/MANIFEST.json"
    "$PYTHON" - "$tmp" "$dir" <<'EOF'
import glob
import hashlib
import json
import os
import sys
import zipfile

tmp, out = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "nvidia_cutlass-*.whl"))
keep = {  # wheel path prefix -> folder under out/cutlass
    "cutlass_library/source/include/": "include/",
    "cutlass_library/source/tools/util/include/": "tools/util/include/",
}
files = total = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if info.is_dir():
            continue
        if name.endswith(".dist-info/licenses/LICENSE.txt") or name.endswith(".dist-info/LICENSE.txt"):
            target = "LICENSE.txt"
        else:
            target = next((dst + name[len(src) :] for src, dst in keep.items() if name.startswith(src)), None)
        if target is None:
            continue
        path = os.path.join(out, "cutlass", target)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with z.open(info) as src, open(path, "wb") as dst:
            dst.write(src.read())
        files += 1
        total += info.file_size
if not os.path.exists(os.path.join(out, "cutlass", "include", "cutlass", "cutlass.h")):
    sys.exit(f"tools/gpu_check.sh: --prepare: {os.path.basename(wheel)} has no cutlass_library/source/include")
with open(wheel, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
manifest = {
    "wheel": os.path.basename(wheel),
    "sha256": sha,
    "cutlass_dir": "cutlass",
    "files": files,
    "bytes": total,
    "use": "tools/gpu_check.sh OUTDIR --from <this folder>",
}
with open(os.path.join(out, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=2)
print(f"gpu_check --prepare: {files} files, {total / 1e6:.1f} MB from {os.path.basename(wheel)}")
EOF
    local bytes
    bytes=$(du -sb "$dir" | cut -f1)
    [ "$bytes" -lt 60000000 ] || die "--prepare: $dir holds $bytes bytes, over the 60 MB limit"
    echo "gpu_check --prepare: wrote $dir ($((bytes / 1000000)) MB); on the GPU machine run:"
    echo "    tools/gpu_check.sh OUTDIR --from $dir"
}

# ---- arguments -------------------------------------------------------------------------------------------------

OUT=""
FROM=${K2_GPU_CHECK_FROM:-}
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --prepare)
            [ $# -eq 2 ] || die "usage: tools/gpu_check.sh --prepare DIR"
            prepare "$2"
            exit 0
            ;;
        --from)
            [ $# -ge 2 ] || die "--from needs a folder (one written by --prepare)"
            FROM=$2
            shift 2
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [ -z "$OUT" ] || die "one output folder only (got '$OUT' and '$1')"
            OUT=$1
            shift
            ;;
    esac
done
[ -n "$OUT" ] || die "usage: tools/gpu_check.sh OUTDIR [--from DIR] | --prepare DIR (see --help)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.json"
STEPS="$OUT/.steps.tsv"
: >"$STEPS"
START=$(date +%s)
BUDGET=${K2_GPU_CHECK_BUDGET:-460}
GPU="" CC="" ARCH="" CUTLASS=""

# summary.json from the steps so far (rewritten after every step, so a killed check leaves one too).
write_summary() {  # [error]
    "$PYTHON" - "$STEPS" "$SUMMARY" "$GPU" "$CC" "$ARCH" "$CUTLASS" "$(($(date +%s) - START))" "${1:-}" <<'EOF'
import json
import sys

steps_file, out, gpu, cc, arch, cutlass, seconds, error = sys.argv[1:]
keys = ["name", "status", "rc", "seconds", "log", "detail", "command"]
steps = []
with open(steps_file) as f:
    for line in f:
        step = dict(zip(keys, line.rstrip("\n").split("\t"), strict=True))
        step["rc"], step["seconds"] = int(step["rc"]), int(step["seconds"])
        steps.append(step)
summary = {
    "ok": not error and bool(steps) and all(s["status"] == "passed" for s in steps),
    "error": error or None,
    "gpu": gpu or None,
    "compute_capability": cc or None,
    "cuda_architectures": arch or None,
    "cutlass_dir": cutlass or None,
    "seconds": int(seconds),
    "failed": [s["name"] for s in steps if s["status"] != "passed"],
    "steps": steps,
}
with open(out + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
import os

os.replace(out + ".tmp", out)
EOF
}

fail_start() {  # the check cannot start: summary.json with the reason, one line on stderr, exit 2
    write_summary "$*" 2>/dev/null || true
    die "$*"
}

# ---- preflight: GPU, nvcc, Python, CUTLASS ----------------------------------------------------------------------

if ! command -v nvidia-smi >/dev/null 2>&1; then
    fail_start "no NVIDIA GPU here (nvidia-smi not found); run this on a GPU machine, or use --prepare DIR on a networked one"
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)
[ -n "$GPU" ] || fail_start "no NVIDIA GPU here (nvidia-smi lists none); run this on a GPU machine"
if ! [[ $CC =~ ^[0-9]+\.[0-9]+$ ]]; then  # old drivers: ask torch
    CC=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)
fi
[[ $CC =~ ^[0-9]+\.[0-9]+$ ]] || fail_start "could not read the compute capability of '$GPU'"
case $CC in
    9.0) ARCH=90a ;;
    8.0) ARCH=80 ;;
    *) ARCH="80;${CC/./}" ;;
esac
ARCH=${CMAKE_CUDA_ARCHITECTURES:-$ARCH}

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
    [ -x /usr/local/cuda/bin/nvcc ] || fail_start "nvcc not found (put it on PATH or set CUDACXX)"
    export CUDACXX=/usr/local/cuda/bin/nvcc
fi
for tool in cmake ninja; do
    command -v "$tool" >/dev/null 2>&1 || fail_start "$tool not found on PATH"
done
missing=$("$PYTHON" - <<'EOF'
import importlib.util
import os
import sysconfig

names = ["torch", "pytest", "numpy", "safetensors", "pybind11"]
missing = [n for n in names if importlib.util.find_spec(n) is None]
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    missing.append("Python.h (the Python development headers)")
print(", ".join(missing))
EOF
) || fail_start "$PYTHON does not run"
[ -z "$missing" ] || fail_start "$PYTHON lacks: $missing"

if [ -n "$FROM" ]; then
    [ -f "$FROM/cutlass/include/cutlass/cutlass.h" ] \
        || fail_start "--from $FROM: no cutlass/include/cutlass/cutlass.h there (write it with --prepare $FROM)"
    CUTLASS=$(cd "$FROM/cutlass" && pwd)
elif [ -n "${K2_CUTLASS_DIR:-}" ]; then
    CUTLASS=$K2_CUTLASS_DIR
else
    CUTLASS=$("$PYTHON" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))' 2>/dev/null || true)
fi
[ -n "$CUTLASS" ] && [ -f "$CUTLASS/include/cutlass/cutlass.h" ] \
    || fail_start "no CUTLASS headers: run 'tools/gpu_check.sh --prepare DIR' on a networked machine, then '--from DIR' here"

# ---- steps -----------------------------------------------------------------------------------------------------

FAILED=0

# step NAME MAX_SECONDS CMD...: runs CMD from the repo root under timeout, output to OUT/NAME.log.
step() {
    local name=$1 max=$2
    shift 2
    local log="$OUT/$name.log" left limit rc t0 status detail=""
    left=$((BUDGET - ($(date +%s) - START)))
    limit=$((max < left ? max : left))
    if [ "$limit" -lt 5 ]; then
        printf '%s\t%s\t%d\t%d\t%s\t%s\t%s\n' "$name" "not run" -1 0 "" "time budget spent" "$*" >>"$STEPS"
        FAILED=1
        write_summary
        echo "[gpu_check] $name: not run (time budget of ${BUDGET}s spent)"
        return 0
    fi
    echo "[gpu_check] $name (at most ${limit}s): $*"
    t0=$(date +%s)
    rc=0
    (cd "$REPO" && timeout --kill-after=10 "$limit" "$@") >"$log" 2>&1 || rc=$?
    status=passed
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
        detail="killed after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        status=failed
    fi
    if [[ $name == test_* ]]; then  # pytest's last line, and gpu tests that skipped for want of CUDA
        detail=$(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$log" | tail -n1 | tr -d '=' \
            | sed 's/^ *//; s/ *$//' || true)
        if [ "$status" = passed ] && grep -q 'SKIPPED .*gpu test:' "$log"; then
            status=failed
            detail="$detail; gpu tests skipped: $(grep -m1 -o 'gpu test: .*' "$log")"
        fi
    fi
    [ "$status" = passed ] || FAILED=1
    printf '%s\t%s\t%d\t%d\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$log" "$detail" "$*" \
        >>"$STEPS"
    write_summary
    echo "[gpu_check] $name: $status (rc $rc, $(($(date +%s) - t0))s)${detail:+ $detail}"
}

BUILD="$REPO/build/gpu-check"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset K2_OPS

# The build, as one shell command (recorded in the summary as it ran).
printf -v BUILD_CMD '%s && %s && rm -f %s/k2/_C.*.so && cp %s/_C.*.so %s/k2/' \
    "$(printf '%q ' cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DK2_BUILD_PYTHON=ON -DK2_CUDA=ON \
        "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" "-DK2_CUTLASS_DIR=$CUTLASS" "-DPython_EXECUTABLE=$("$PYTHON" -c 'import sys; print(sys.executable)')" \
        "-Dpybind11_DIR=$("$PYTHON" -m pybind11 --cmakedir)")" \
    "$(printf '%q ' cmake --build "$BUILD" --target _C -j "$(nproc)")" \
    "$(printf '%q' "$REPO")" "$(printf '%q' "$BUILD")" "$(printf '%q' "$REPO")"

# What the build must have produced, checked from Python (written next to the build).
mkdir -p "$BUILD"
cat >"$BUILD/check_build_info.py" <<'EOF'
"""tools/gpu_check.sh's build_info step: k2._C is the tree's fresh build, with CUDA, CUTLASS and every family's
CUDA kernels for ARCH, and torch sees the GPU. Usage: check_build_info.py ARCH OUT_JSON"""

import glob
import json
import os
import sys

import torch

import k2
from k2 import _C

arch, out = sys.argv[1:]
info = dict(_C.build_info())
info.update(
    module=_C.__file__,
    available=_C.available(),
    torch=torch.__version__,
    torch_cuda=torch.version.cuda,
    device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    capability=torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
)
with open(out, "w") as f:
    json.dump(info, f, indent=2, default=str)
print(json.dumps(info, indent=2, default=str))
built = [os.path.realpath(p) for p in glob.glob(os.path.join(os.path.dirname(k2.__file__), "_C.*.so"))]
problems = []
if os.path.realpath(_C.__file__) not in built:
    problems.append(f"k2._C comes from {_C.__file__}, not this build: an installed k2 shadows the tree (uninstall it)")
if not info["cuda"]:
    problems.append("k2._C has no CUDA kernels")
if not info.get("cutlass"):
    problems.append("k2._C has no CUTLASS kernels")
if sorted(info["cuda_architectures"]) != sorted(arch.split(";")):
    problems.append(f"built for {info['cuda_architectures']}, expected {arch}")
missing = [f for f in ("gemm", "moe", "optim", "quant") if "cuda" not in info["available"].get(f, [])]
if missing:
    problems.append(f"no CUDA kernels for {missing}")
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA device")
for p in problems:
    print("build_info:", p)
sys.exit(1 if problems else 0)
EOF

echo "[gpu_check] $GPU (compute capability $CC): building for $ARCH with CUTLASS from $CUTLASS; logs in $OUT"
{
    nvidia-smi || true
    "${CUDACXX:-nvcc}" --version || true
    "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda)' || true
    cmake --version | head -n1
    echo "ninja $(ninja --version)"
    git -C "$REPO" log -1 --format='k2 commit %H %s' 2>/dev/null || true
    git -C "$REPO" status --short 2>/dev/null || true
} >"$OUT/environment.log" 2>&1

step build 360 bash -c "$BUILD_CMD"
if [ "$FAILED" -ne 0 ]; then
    write_summary "the build failed: see $OUT/build.log"
    echo "[gpu_check] FAILED: the build failed, nothing else ran; see $OUT/build.log and $SUMMARY" >&2
    exit 1
fi
step build_info 60 "$PYTHON" "$BUILD/check_build_info.py" "$ARCH" "$OUT/build_info.json"

mapfile -t test_files < <(cd "$REPO" && grep -l 'pytest\.mark\.gpu' python_tests/test_*.py)
for file in "${test_files[@]}" python_tests/test_build.py; do
    name=$(basename "$file" .py)
    step "$name" 200 "$PYTHON" -m pytest "$file" -q -p no:cacheprovider
done

step bench_fp8 60 "$PYTHON" tools/bench_fp8.py --device cuda --min-time 0.25 --json "$OUT/bench_fp8.json"
step bench_moe 90 "$PYTHON" tools/bench_moe.py --device cuda --tokens 8192 --scale 1 --experts 64 --repeat 3 \
    --json "$OUT/bench_moe.json"
step bench_ns 60 "$PYTHON" tools/bench_ns.py --device cuda --shapes 64x2048x7168 16x7168x2048 8x4096x4096 \
    --json "$OUT/bench_ns.json"
step bench_optim 90 "$PYTHON" tools/bench_optim.py --device cuda --sets small-experts,kimi_k2-experts \
    --json "$OUT/bench_optim.json"

write_summary
if [ "$FAILED" -ne 0 ]; then
    echo "[gpu_check] FAILED after $(($(date +%s) - START))s: $("$PYTHON" -c 'import json, sys; print(", ".join(json.load(open(sys.argv[1]))["failed"]))' "$SUMMARY"); see $SUMMARY" >&2
    exit 1
fi
echo "[gpu_check] all steps passed in $(($(date +%s) - START))s; see $SUMMARY"
