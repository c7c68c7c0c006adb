"""The native boundary as the quant family exercises it: view tuples (strided and malformed), DLPack objects
from NumPy and torch (float8 included), k2.ops.available(), K2_OPS=reference, and CUDA views that this machine
or build cannot run — each rejected with an error naming the op and the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import k2.ops
from k2.ops import _native, reference

C = _native.native()
needs_native = pytest.mark.skipif(C is None, reason="k2._C is not built")


def outputs(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(x.shape, dtype=dtype), torch.empty(*x.shape[:-1], -(-x.shape[-1] // 128))


@needs_native
def test_available_reports_quant_for_the_built_devices():
    available = k2.ops.available()
    expected = ["cpu", "cuda"] if C.build_info()["cuda"] else ["cpu"]
    assert available["quant"] == expected
    assert _native.has_kernel("quant", torch.device("cpu"))


@needs_native
def test_k2_ops_reference_forces_the_reference(monkeypatch):
    calls = []
    original = reference.quantize_1x128

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(reference, "quantize_1x128", spy)
    x = torch.randn(4, 256)
    native_q, native_s = k2.ops.quantize_1x128(x)
    assert calls == []  # the C++ kernel served it
    monkeypatch.setenv("K2_OPS", "reference")
    assert not _native.has_kernel("quant", torch.device("cpu"))
    q, s = k2.ops.quantize_1x128(x)
    assert len(calls) == 1
    assert torch.equal(q.view(torch.uint8), native_q.view(torch.uint8)) and torch.equal(s, native_s)


@needs_native
def test_strided_view_tuple_is_read_in_place():
    base = torch.randn(8, 512)
    x = base[::2, 64:364]  # rows 1024 elements apart, 300 columns
    q, s = outputs(x)
    C.quantize_1x128(_native.view(x), _native.view(q), _native.view(s), False, 0)
    q_ref, s_ref = reference.quantize_1x128(x, torch.float8_e4m3fn, False)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@needs_native
def test_dlpack_from_numpy_and_torch_float8():
    x_np = np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32)
    s_np = np.empty((3, 3), dtype=np.float32)
    q = torch.empty(3, 300, dtype=torch.float8_e5m2)  # torch exports float8 through DLPack
    C.quantize_1x128(x_np, q, s_np, True, 0)
    q_ref, s_ref = reference.quantize_1x128(torch.from_numpy(x_np), torch.float8_e5m2, True)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert np.array_equal(s_np, s_ref.numpy())
    # float8 input through DLPack too: dequantize a torch float8 tensor into a NumPy output.
    scale = np.full((1, 3), 0.5, dtype=np.float32)
    out = np.empty((3, 300), dtype=np.float32)
    C.dequantize_128x128(q, scale, out, 0)
    expected = reference.dequantize_128x128(q, torch.from_numpy(scale), torch.float32)
    np.testing.assert_array_equal(out, expected.numpy())


@needs_native
def test_strided_numpy_array_through_dlpack():
    base = np.random.default_rng(1).standard_normal((6, 400)).astype(np.float32)
    x_np = base[::3, :256]  # non-contiguous rows, unit-stride last dim
    q = torch.empty(2, 256, dtype=torch.float8_e4m3fn)
    s = torch.empty(2, 2)
    C.quantize_1x128(x_np, _native.view(q), _native.view(s), False, 0)
    q_ref, s_ref = reference.quantize_1x128(torch.from_numpy(np.ascontiguousarray(x_np)), torch.float8_e4m3fn, False)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def _bad(view_or_obj, match: str, exc: type[Exception] = ValueError) -> None:
    x = torch.randn(4, 256)
    q, s = outputs(x)
    with pytest.raises(exc, match=match):
        C.quantize_1x128(view_or_obj, _native.view(q), _native.view(s), False, 0)


@needs_native
def test_bad_views_name_op_and_argument():
    x = torch.randn(4, 256)
    v = _native.view(x)
    op = r"k2\.ops\.quantize_1x128: argument 'x': "
    _bad(v[:5], op + "expected a view .* got a tuple of 5 items")
    _bad((v[0], (4, -1), v[2], *v[3:]), op + "negative size")
    _bad((v[0], (4, 256), (256,), *v[3:]), op + "shape has 2 dims but strides has 1")
    _bad((v[0], v[1], v[2], "complex64", *v[4:]), op + "unsupported dtype 'complex64'")
    _bad((0, *v[1:]), op + "null data pointer")
    _bad((v[0], v[1], v[2], v[3], "tpu", 0), op + "expected device 'cpu' or 'cuda'")
    _bad(object(), op + "expected a tensor view tuple or an object with __dlpack__")
    _bad(_native.view(x.int()), op + "expected dtype float32 or bfloat16 or float16, got int32")
    mt = torch.randn(256, 4).mT  # last-dim stride 256
    _bad(_native.view(mt), op + r"expected the last dim to be contiguous \(stride 1\)")


@needs_native
def test_bad_outputs_name_the_output():
    x = torch.randn(4, 300)
    q, s = outputs(x)
    v = _native.view
    with pytest.raises(ValueError, match=r"quantize_1x128: argument 'scale': expected shape \[4, 3\]"):
        C.quantize_1x128(v(x), v(q), v(torch.empty(4, 2)), False, 0)
    with pytest.raises(ValueError, match=r"quantize_1x128: argument 'q': expected dtype float8_e4m3fn or float8_e5m2"):
        C.quantize_1x128(v(x), v(torch.empty(4, 300, dtype=torch.bfloat16)), v(s), False, 0)
    with pytest.raises(ValueError, match=r"quantize_1x128: argument 'q': expected a contiguous tensor"):
        C.quantize_1x128(v(x), v(torch.empty(300, 4, dtype=torch.float8_e4m3fn).mT), v(s), False, 0)
    w = torch.randn(256, 300)
    with pytest.raises(ValueError, match=r"quantize_128x128: argument 'scale_inv': expected shape \[2, 3\]"):
        C.quantize_128x128(v(w), v(torch.empty(256, 300, dtype=torch.float8_e4m3fn)), v(torch.empty(3, 2)), 0)
    with pytest.raises(ValueError, match=r"dequantize_128x128: argument 'out': expected dtype float32"):
        C.dequantize_128x128(
            v(torch.empty(256, 300, dtype=torch.float8_e4m3fn)), v(torch.empty(2, 3)), v(torch.empty(256, 300).int()), 0
        )


@needs_native
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA device")
def test_cuda_view_is_rejected_naming_op_and_argument():
    # A CUDA view this process cannot run: a build without CUDA kernels says so (RuntimeError), a CUDA build on
    # a machine without a device or driver says that (ValueError). Either way nothing is dereferenced.
    x = torch.randn(4, 256)
    q, s = outputs(x)
    cuda_view = (*_native.view(x)[:4], "cuda", 0)
    with pytest.raises((RuntimeError, ValueError), match=r"k2\.ops\.quantize_1x128: argument 'x'.* CUDA"):
        C.quantize_1x128(cuda_view, _native.view(q), _native.view(s), False, 0)
    w_view = (*_native.view(torch.randn(128, 128))[:4], "cuda", 0)
    with pytest.raises((RuntimeError, ValueError), match=r"k2\.ops\.quantize_128x128: argument 'w'.* CUDA"):
        C.quantize_128x128(
            w_view, _native.view(torch.empty(128, 128, dtype=torch.float8_e4m3fn)), _native.view(torch.empty(1, 1)), 0
        )


@needs_native
def test_empty_tensors_are_contiguous_whatever_their_strides():
    x = torch.empty(0, 300)
    q = torch.empty(300, 0, dtype=torch.float8_e4m3fn).mT  # shape [0, 300], strides (1, 300)
    s = torch.empty(3, 0).mT
    C.quantize_1x128(_native.view(x), _native.view(q), _native.view(s), False, 0)
    ref_q, ref_s = reference.quantize_1x128(x, torch.float8_e4m3fn, False)
    assert q.shape == ref_q.shape and s.shape == ref_s.shape


class _Producer:
    """A DLPack producer that reports ``device_type`` and records the stream ``__dlpack__`` is asked for (its data
    is a CPU tensor, so the op can run whatever it reports)."""

    def __init__(self, t: torch.Tensor, device_type: int) -> None:
        self.t, self.device_type, self.streams = t, device_type, []

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device_type, 0)

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self.t.__dlpack__()


@needs_native
def test_dlpack_cuda_producers_get_the_ops_stream():
    # DLPack's stream handshake: a CUDA producer is told the stream the op runs on, so it can order its pending
    # work on the tensor before it; the legacy default stream (handle 0) is spelled 1. CPU producers get none.
    x = torch.randn(4, 256)
    q, s = outputs(x)
    for stream, expected in [(0x7F00, 0x7F00), (0, 1)]:
        producer = _Producer(x, 2)
        C.quantize_1x128(producer, _native.view(q), _native.view(s), False, stream)
        assert producer.streams == [expected]
    cpu_producer = _Producer(x, 1)
    C.quantize_1x128(cpu_producer, _native.view(q), _native.view(s), False, 0x7F00)
    assert cpu_producer.streams == [None]
    q_ref, s_ref = reference.quantize_1x128(x, torch.float8_e4m3fn, False)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@needs_native
def test_view_tuples_of_any_int_sequences_read_the_same():
    """torch.Size / tuple views take the CPython fast path; lists and NumPy integers the checked one: same view."""
    x = torch.randn(8, 512)[::2, 64:364]
    v = _native.view(x)
    assert isinstance(v[1], torch.Size)
    expected = C.describe(v)
    assert expected == "float32[4, 300] strides [1024, 1] on cpu"
    assert C.describe((v[0], list(v[1]), list(v[2]), *v[3:])) == expected
    assert C.describe((np.uint64(v[0]), tuple(np.int64(n) for n in v[1]), v[2], *v[3:])) == expected


@needs_native
def test_getenv_follows_os_environ(monkeypatch):
    """k2.ops reads K2_OPS through the C environment (no exception when unset); os.environ writes through to it."""
    monkeypatch.delenv("K2_OPS", raising=False)
    assert C.getenv("K2_OPS") is None and not _native.forced_reference()
    monkeypatch.setenv("K2_OPS", " Reference ")
    assert C.getenv("K2_OPS") == " Reference " and _native.forced_reference()
    monkeypatch.delenv("K2_OPS")
    assert C.getenv("K2_OPS") is None


@needs_native
def test_none_is_an_empty_workspace():
    """``_native.call`` passes None when an op's workspace query says 0 bytes: the same as an empty uint8 tensor."""
    q, cache = torch.randn(2, 4, 48), torch.randn(2, 16, 48)
    lengths = torch.tensor([16, 5], dtype=torch.int32)
    assert C.mla_decode_workspace_size(2, 4, 32, 16, "cpu", 0) == 0
    results = []
    for workspace in (None, _native.view(torch.empty(0, dtype=torch.uint8))):
        o, lse = torch.empty(2, 4, 32), torch.empty(2, 4)
        v = _native.view
        C.mla_decode(v(q), v(cache), v(lengths), v(o), v(lse), 0.125, 32, workspace, 0)
        results.append((o, lse))
    o_ref, lse_ref = reference.mla_decode(q, cache, lengths, 0.125, 32)
    for o, lse in results:
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
