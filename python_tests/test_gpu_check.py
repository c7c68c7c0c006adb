"""tools/gpu_check.sh and the CMake side of CUTLASS, on a machine without a GPU: the check refuses to start with
one clear line (no GPU, no CUTLASS), ``--prepare`` gathers CUTLASS's headers into a folder under 60 MB (needs
network), and a CUDA configure finds CUTLASS there, or fails when K2_CUDA=ON and CUTLASS is missing (needs
nvcc). The check itself runs on a GPU machine; see its header and the README's "Verifying on a GPU"."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
HAVE_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
HAVE_CMAKE = shutil.which("cmake") is not None and shutil.which("ninja") is not None


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        timeout=timeout,
    )


def fake_nvidia_smi(tmp_path: Path, body: str) -> dict[str, str]:
    """PATH with an ``nvidia-smi`` that runs ``body`` first."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def one_line_error(result: subprocess.CompletedProcess, starts: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tools/gpu_check.sh: {starts}"), lines[0]
    return lines[0]


def test_usage() -> None:
    one_line_error(run(), "usage: tools/gpu_check.sh OUTDIR")
    help_text = run("--help")
    assert help_text.returncode == 0
    assert "--prepare DIR" in help_text.stdout and "OUTDIR [--from DIR]" in help_text.stdout


def test_without_a_gpu_it_fails_with_one_clear_line(tmp_path: Path) -> None:
    # nvidia-smi present but finding no GPU (no driver, no device): the same on machines with and without GPUs.
    env = fake_nvidia_smi(
        tmp_path, "echo 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2; exit 9"
    )
    one_line_error(run(tmp_path / "out", env=env), "no NVIDIA GPU here (nvidia-smi lists none)")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] is False and "no NVIDIA GPU" in summary["error"] and summary["steps"] == []
    if shutil.which("nvidia-smi") is None:
        one_line_error(run(tmp_path / "out2"), "no NVIDIA GPU here (nvidia-smi not found)")


@pytest.mark.skipif(not (HAVE_NVCC and HAVE_CMAKE), reason="needs nvcc, cmake and ninja")
def test_without_cutlass_it_names_the_prepare_step(tmp_path: Path) -> None:
    env = fake_nvidia_smi(
        tmp_path, 'case "$*" in *compute_cap*) echo 9.0 ;; *name*) echo "NVIDIA H100 80GB HBM3" ;; esac'
    )
    result = run(tmp_path / "out", "--from", tmp_path / "nowhere", env=env)
    line = one_line_error(result, "")
    assert "--prepare" in line, line


def _network() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by ``tools/gpu_check.sh --prepare`` (downloads the nvidia-cutlass wheel, ~7 MB)."""
    if not _network():
        pytest.skip("--prepare needs network access to PyPI")
    out = tmp_path_factory.mktemp("gpu-prep")
    result = run("--prepare", out, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow
def test_prepare_gathers_cutlass_headers_under_60_mb(prepared: Path) -> None:
    size = sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file())
    assert size < 60e6, size
    assert (prepared / "cutlass" / "include" / "cutlass" / "cutlass.h").is_file()
    assert (prepared / "cutlass" / "include" / "cute" / "tensor.hpp").is_file()
    assert (prepared / "cutlass" / "LICENSE.txt").is_file()
    manifest = json.loads((prepared / "MANIFEST.json").read_text())
    assert manifest["wheel"].startswith("nvidia_cutlass-") and len(manifest["sha256"]) == 64
    # Nothing beyond the headers: no Python package, no examples.
    assert {p.name for p in prepared.iterdir()} == {"cutlass", "MANIFEST.json"}
    assert not list(prepared.rglob("*.py"))


def configure(tmp_path: Path, *defines: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A CUDA configure of k2 for 90a (no compile), with the extension target as gpu_check.sh builds it."""
    pybind11_dir = subprocess.run(
        [sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    args = ["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), "-G", "Ninja", "-DK2_CUDA=ON"]
    args += ["-DK2_BUILD_PYTHON=ON", "-DCMAKE_CUDA_ARCHITECTURES=90a", f"-DPython_EXECUTABLE={sys.executable}"]
    args += [f"-Dpybind11_DIR={pybind11_dir}", *defines]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE_NVCC and HAVE_CMAKE), reason="needs nvcc, cmake and ninja")
def test_cuda_configure_finds_cutlass_in_a_prepared_folder(prepared: Path, tmp_path: Path) -> None:
    cutlass = prepared / "cutlass"
    result = configure(tmp_path, f"-DK2_CUTLASS_DIR={cutlass}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"CUTLASS '{cutlass}'" in result.stdout
    ninja = (tmp_path / "build" / "build.ninja").read_text()
    assert "sm90_fp8_blockwise.cu.o" in ninja and "sm90_bf16_row_col.cu.o" in ninja  # the Hopper kernels build
    assert str(cutlass / "include") in ninja
    assert "-DK2_WITH_CUTLASS" in ninja  # build_info()["cutlass"] will say true


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE_NVCC and HAVE_CMAKE), reason="needs nvcc, cmake and ninja")
def test_cuda_on_without_cutlass_is_a_configure_error(tmp_path: Path) -> None:
    # K2_CUTLASS_DIR (from the environment) naming a folder without CUTLASS.
    (tmp_path / "empty").mkdir()
    result = configure(tmp_path / "a", env={"K2_CUTLASS_DIR": str(tmp_path / "empty")})
    assert result.returncode != 0
    assert "K2_CUTLASS_DIR" in result.stderr and "has no include/cutlass/cutlass.h" in result.stderr
    # No K2_CUTLASS_DIR and no nvidia-cutlass in the build's Python (hidden by a module that fails to import).
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "cutlass_library.py").write_text("raise ImportError('hidden for this test')\n")
    env = {"PYTHONPATH": str(shim), "K2_CUTLASS_DIR": ""}
    result = configure(tmp_path / "b", env=env)
    assert result.returncode != 0
    assert "K2_CUDA=ON but CMake found no CUTLASS headers" in result.stderr
