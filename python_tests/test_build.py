"""Properties of the built extension that users rely on: k2._C links no torch library (one wheel for any
torch), a CUDA build really contains device code for the architectures it reports, and it never lost CUTLASS
(whose absence would leave bf16 on CUDA cores and no FP8 GEMM while every CPU test still passes)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from k2.ops import _native

C = _native.native()
pytestmark = pytest.mark.skipif(C is None, reason="k2._C is not built")


def cuobjdump() -> str | None:
    """cuobjdump from PATH, or from the nvidia-cuda-cuobjdump wheel (a test extra)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia.cu13
    except ImportError:
        return None
    for root in nvidia.cu13.__path__:
        path = os.path.join(root, "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None


def needed_libraries(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_extension_links_no_torch_library() -> None:
    libs = needed_libraries(C.__file__)
    assert libs, "readelf found no NEEDED entries; the check would be vacuous"
    torch_libs = [lib for lib in libs if re.match(r"lib(torch|c10|shm|caffe2)", lib)]
    assert not torch_libs, f"k2._C must not link torch, but needs {torch_libs}"
    assert not [lib for lib in libs if lib.startswith("libcudart")], "the CUDA runtime is linked statically"


def test_extension_has_no_torch_symbols() -> None:
    # A torch-header build would reference c10/at symbols; the framework-neutral core references none.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", C.__file__], capture_output=True, text=True, check=True)
    assert not re.search(r"\b_ZN(3c10|2at|5torch)", out.stdout)


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump not installed")
def test_cuda_build_contains_device_code_for_each_architecture() -> None:
    build = C.build_info()
    if not build["cuda"]:
        pytest.skip("k2._C was built without CUDA")
    if not [f for f, devices in C.available().items() if "cuda" in devices]:
        pytest.skip("no CUDA kernel family in this build yet")
    out = subprocess.run([cuobjdump(), "--list-elf", C.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for arch in build["cuda_architectures"]:
        assert f"sm_{arch}" in out.stdout, f"no sm_{arch} device code in k2._C:\n{out.stdout}"


def test_build_info_reports_cutlass_and_a_cuda_build_has_it() -> None:
    build = C.build_info()
    assert isinstance(build.get("cutlass"), bool), build
    if build["cuda"]:
        assert build["cutlass"], (
            "k2._C has CUDA kernels but not the CUTLASS tensor-core GEMMs: rebuild with nvidia-cutlass installed "
            f"(or K2_CUTLASS_DIR) and 90a or 80 in CMAKE_CUDA_ARCHITECTURES; build_info: {build}"
        )
    else:
        assert not build["cutlass"]
