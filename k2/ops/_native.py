"""The seam between ``k2.ops`` and the native extension ``k2._C``.

``k2._C`` is framework-neutral: it never sees a torch object. A tensor crosses as a validated view, the tuple
``(data_ptr, shape, strides, dtype_name, device_type, device_index)``; C++ checks it and builds the kernel's
params struct. Outputs are allocated by torch in the op and passed in the same way (destination passing), and so
is every kernel's scratch memory: a uint8 ``workspace`` of the size the op's ``k2._C.<op>_workspace_size`` query
returns, allocated by :func:`call` through torch's caching allocator. The native code allocates nothing.

:func:`call` is the one place a native kernel is launched from: it makes the tensors' CUDA device current for the
call (the native code launches on the current device, so a tensor on ``cuda:1`` must not run while ``cuda:0``
is current) and passes torch's current stream on that device as an integer handle.

Dispatch (architecture §4): CUDA kernel → C++ CPU kernel → ``k2.ops.reference``. ``K2_OPS=reference`` forces
the reference everywhere; it is read at every call so tests and benchmarks can switch it. Tensors of a dtype no
native kernel takes (float64, complex) run the reference on every device (:func:`kernel_module`).

Autocast: :func:`register_autocast` gives the matmul-like ops the rule torch gives ``torch.mm``: under
``torch.autocast`` their floating inputs are cast to the autocast dtype, so bf16 autocast reaches the bf16
tensor-core kernels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
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


# The environment as the C library sees it (os.environ writes through): an unset name is a plain None, where
# os.environ.get raises and catches a KeyError — a cost paid on every dispatch otherwise.
_getenv = os.environ.get if _native_module is None else _native_module.getenv


def forced_reference() -> bool:
    """True when ``K2_OPS=reference`` asks for the PyTorch reference of every op."""
    value = _getenv("K2_OPS")
    return value is not None and value.strip().lower() == "reference"


def available() -> dict[str, list[str]]:
    """Kernel families compiled into ``k2._C`` and the device types each has kernels for."""
    return {family: sorted(devices) for family, devices in _KERNELS.items()}


# The dtypes that cross the native boundary (csrc/common/dtype.h). Anything else (float64, complex) has no kernel.
NATIVE_DTYPES = frozenset(
    {
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
    }
)


def has_kernel(family: str, device: torch.device) -> bool:
    """Whether ``family`` has a native kernel for ``device`` that dispatch may use now."""
    return device.type in _KERNELS.get(family, ()) and not forced_reference()


def kernel_module(family: str, device: torch.device, *dtypes: torch.Tensor | torch.dtype) -> ModuleType | None:
    """``k2._C`` when dispatch should run ``family``'s native kernel for ``device`` now, else None (reference).

    ``dtypes`` (tensors or dtypes) are the call's operands and result types: if any is a dtype the native kernels
    do not take (float64, complex), the call runs the reference — on CPU and CUDA alike — instead of failing in
    the native argument checks."""
    if not has_kernel(family, device):
        return None
    for d in dtypes:
        if (d.dtype if isinstance(d, torch.Tensor) else d) not in NATIVE_DTYPES:
            return None
    return _native_module


class _DTypeNames(dict):
    """``torch.float32`` → ``"float32"``: one dict lookup per view; a dtype seen for the first time is named on the
    way (the native side rejects the ones it does not take)."""

    def __missing__(self, dtype: torch.dtype) -> str:
        self[dtype] = name = str(dtype).removeprefix("torch.")
        return name


_DTYPE_NAMES = _DTypeNames()
_CPU = ("cpu", 0)


def view(t: torch.Tensor) -> View:
    """The native boundary's view of ``t``; the tensor must stay alive until the native call returns.

    Built on every kernel launch (a decode step makes several per layer), so it avoids the slow accessors:
    ``torch.Size`` is already a tuple, the dtype name comes from a table and a CPU tensor's device is a constant."""
    device = _CPU if t.is_cpu else (t.device.type, t.device.index or 0)
    return (t.data_ptr(), t.shape, t.stride(), _DTYPE_NAMES[t.dtype], *device)


def stream(device: torch.device) -> int:
    """The caller's current CUDA stream handle for ``device`` (0 for CPU work)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device for a native call (nothing to do for CPU work)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device())


def call(fn: str, device: torch.device, *args: object, workspace: tuple[str, Sequence[object]] | None = None) -> None:
    """Runs ``k2._C.<fn>(*args[, workspace], stream)`` for work on ``device``; every native kernel launches here.

    Tensors in ``args`` are passed as :func:`view` tuples. The call runs with ``device`` current (CUDA) and gets
    torch's current stream on it. ``workspace=(query, sizes)`` asks ``k2._C.<query>(*sizes, device_type,
    device_index)`` for the kernel's scratch bytes, allocates them here as a uint8 tensor through torch's caching
    allocator (stream-ordered, freed when the call returns even if it raises) and passes it before the stream, or
    None when the query says 0 bytes.
    """
    if device.type != "cuda":  # CPU work: no device to make current and no stream (this runs on every launch)
        _launch(fn, device, args, workspace, 0)
        return
    with device_guard(device):
        _launch(fn, device, args, workspace, stream(device))


def _launch(
    fn: str, device: torch.device, args: tuple, workspace: tuple[str, Sequence[object]] | None, stream_handle: int
) -> None:
    mod = _native_module
    if workspace is not None:
        query, sizes = workspace
        nbytes = getattr(mod, query)(*sizes, device.type, device.index or 0)
        # alive in `args` until the call returns; None: no scratch needed (the native side passes an empty one)
        args = (*args, torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None)
    getattr(mod, fn)(*[view(a) if isinstance(a, torch.Tensor) else a for a in args], stream_handle)


_AUTOCAST_LIB = torch.library.Library("k2", "FRAGMENT")


def register_autocast(name: str, *, cast: Sequence[int] | None = None) -> None:
    """Under ``torch.autocast`` (CUDA and CPU), the custom op ``k2::<name>`` runs with its floating inputs cast to
    the autocast dtype (torch's rule for ``torch.mm``): positional arguments ``cast`` (default: every tensor
    argument); float64 and tensors on another device type are left alone, as torch's own autocast does. The casts
    are ordinary differentiable ``.to`` calls, so gradients reach the inputs in their own dtype (fp32 parameters
    get fp32 grads). Unlike ``torch.library.register_autocast``, the dtype is the one autocast was entered with
    (bf16 or fp16), not one fixed at registration."""
    op = getattr(torch.ops.k2, name).default

    def rule(device_type: str):
        def kernel(_keyset: torch._C.DispatchKeySet, *args: object) -> object:
            dtype = torch.get_autocast_dtype(device_type)
            positions = range(len(args)) if cast is None else cast
            args = list(args)
            for i in positions:
                a = args[i]
                if (
                    isinstance(a, torch.Tensor)
                    and a.is_floating_point()
                    and a.dtype != torch.float64
                    and a.device.type == device_type
                ):
                    args[i] = a.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return op(*args)

        return kernel

    for device_type in ("cuda", "cpu"):
        _AUTOCAST_LIB.impl(name, rule(device_type), "Autocast" + device_type.upper(), with_keyset=True)
