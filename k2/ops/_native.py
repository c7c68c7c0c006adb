"""The seam between ``k2.ops`` and the native extension ``k2._C``.

``k2._C`` is framework-neutral: it never sees a torch object. A tensor crosses as a validated view, the tuple
``(data_ptr, shape, strides, dtype_name, device_type, device_index)``; C++ checks it and builds the kernel's
params struct. Outputs are allocated here, by torch, and passed in the same way (destination passing), so the
native code never allocates tensor memory. CUDA kernels run on the stream passed as an integer handle.

Dispatch (architecture §4): CUDA kernel → C++ CPU kernel → ``k2.ops.reference``. ``K2_OPS=reference`` forces
the reference everywhere; it is read at every call so tests and benchmarks can switch it.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

try:
    from k2 import _C as _native_module
except ImportError:  # a source tree without a build: every op runs its PyTorch reference
    _native_module = None

View = tuple[int, tuple[int, ...], tuple[int, ...], str, str, int]

# Fixed when the extension loads: family -> device types with a kernel. Read once, not at every op call.
_KERNELS: dict[str, frozenset[str]] = (
    {} if _native_module is None else {f: frozenset(d) for f, d in _native_module.available().items()}
)


def native() -> ModuleType | None:
    """The loaded ``k2._C`` module, or None when k2 was not built with native kernels."""
    return _native_module


def forced_reference() -> bool:
    """True when ``K2_OPS=reference`` asks for the PyTorch reference of every op."""
    return os.environ.get("K2_OPS", "").strip().lower() == "reference"


def available() -> dict[str, list[str]]:
    """Kernel families compiled into ``k2._C`` and the device types each has kernels for."""
    return {family: sorted(devices) for family, devices in _KERNELS.items()}


def has_kernel(family: str, device: torch.device) -> bool:
    """Whether ``family`` has a native kernel for ``device`` that dispatch may use now."""
    return device.type in _KERNELS.get(family, ()) and not forced_reference()


def kernel_module(family: str, device: torch.device) -> ModuleType | None:
    """``k2._C`` when dispatch should run ``family``'s native kernel for ``device`` now, else None (reference)."""
    return _native_module if has_kernel(family, device) else None


def view(t: torch.Tensor) -> View:
    """The native boundary's view of ``t``; the tensor must stay alive until the native call returns."""
    return (
        t.data_ptr(),
        tuple(t.shape),
        tuple(t.stride()),
        str(t.dtype).removeprefix("torch."),
        t.device.type,
        t.device.index or 0,
    )


def stream(device: torch.device) -> int:
    """The caller's current CUDA stream handle for ``device`` (0 for CPU work)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
