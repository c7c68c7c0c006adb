// Python bindings of the quant family: validate the views, fill the params struct, run the CPU or CUDA kernel.
// Inputs may have strided rows (any strides before a unit-stride last dim); outputs must be contiguous.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "quant/quant.h"

namespace py = pybind11;

namespace k2 {

namespace {

using quant::Fp8;
using quant::kGroup;

const std::initializer_list<DType> kFloatTypes = {DType::Float32, DType::BFloat16, DType::Float16};
const std::initializer_list<DType> kFp8Types = {DType::Float8E4M3, DType::Float8E5M2};

// Every input's device check: a CUDA view needs a CUDA build and a usable device.
void expect_runnable(const TensorView& t, const char* op, const char* arg) {
    expect_device_supported(t, op, arg, kHasCuda);
#ifdef K2_WITH_CUDA
    if (t.device == DeviceType::CUDA) {
        const std::string problem = quant::cuda_device_problem(t.device_index);
        K2_CHECK_ARG(problem.empty(), op, arg, "is a CUDA tensor, but ", problem);
    }
#endif
}

int64_t cdiv(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}

Fp8 fmt_of(DType d) {
    return d == DType::Float8E4M3 ? Fp8::E4M3 : Fp8::E5M2;
}

// The rows of t (every dim but the last): unit-stride last dim required, leading dims merged where contiguous.
quant::RowLayout row_layout(const TensorView& t, const char* op, const char* arg) {
    K2_CHECK_ARG(t.ndim() >= 1, op, arg, "expected at least 1 dim, got a 0-D tensor");
    K2_CHECK_ARG(t.size(-1) <= 1 || t.stride(-1) == 1, op, arg,
                 "expected the last dim to be contiguous (stride 1), got ", t.describe());
    quant::RowLayout layout;
    if (t.numel() == 0) return layout;
    std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first, size-1 dims dropped
    for (int64_t d = 0; d + 1 < t.ndim(); ++d) {
        if (t.shape[d] == 1) continue;
        if (!dims.empty() && dims.back().second == t.strides[d] * t.shape[d]) {  // outer dim = inner * size
            dims.back() = {dims.back().first * t.shape[d], t.strides[d]};
        } else {
            dims.emplace_back(t.shape[d], t.strides[d]);
        }
    }
    K2_CHECK_ARG(int64_t(dims.size()) <= quant::kMaxRowDims, op, arg, "expected at most ", quant::kMaxRowDims,
                 " non-mergeable leading dims, got ", t.describe());
    layout.ndim = int32_t(dims.size());
    for (std::size_t i = 0; i < dims.size(); ++i) layout.shape[i] = dims[i].first, layout.stride[i] = dims[i].second;
    return layout;
}

// Checks an output: contiguous, the expected shape and dtypes, on the input's device.
void expect_output(const PyTensor& out, const PyTensor& in, const char* op, const char* arg,
                   const std::vector<int64_t>& shape, std::initializer_list<DType> dtypes) {
    expect_shape(out.view, op, arg, shape);
    expect_dtype(out.view, op, arg, dtypes);
    if (out.view.numel() > 0) expect_contiguous(out.view, op, arg);  // torch gives empty tensors any strides
    expect_same_device(in.view, out.view, op, arg);
    expect_device_supported(out.view, op, arg, kHasCuda);
}

std::vector<int64_t> with_last(std::vector<int64_t> shape, std::initializer_list<int64_t> last, int drop) {
    shape.resize(shape.size() - drop);
    shape.insert(shape.end(), last);
    return shape;
}

int64_t batch_of(const TensorView& t) {
    int64_t b = 1;
    for (int64_t d = 0; d + 2 < t.ndim(); ++d) b *= t.shape[d];
    return b;
}

void quantize_1x128(const py::handle& x_obj, const py::handle& q_obj, const py::handle& scale_obj, bool pow2_scale,
                    uintptr_t stream) {
    const char* op = "quantize_1x128";
    PyTensor x = to_view(x_obj, op, "x", stream), q = to_view(q_obj, op, "q", stream),
             scale = to_view(scale_obj, op, "scale", stream);
    expect_dtype(x.view, op, "x", kFloatTypes);
    expect_runnable(x.view, op, "x");
    const quant::RowLayout rows = row_layout(x.view, op, "x");
    const int64_t K = x.view.size(-1), R = K ? x.view.numel() / K : 0;
    expect_output(q, x, op, "q", x.view.shape, kFp8Types);
    expect_output(scale, x, op, "scale", with_last(x.view.shape, {cdiv(K, kGroup)}, 1), {DType::Float32});
    if (x.view.numel() == 0) return;
    quant::Quantize1x128Params p{x.view.data, rows, q.view.data,  static_cast<float*>(scale.view.data),
                                 R,           K,    x.view.dtype, fmt_of(q.view.dtype),
                                 pow2_scale};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (x.view.device == DeviceType::CUDA) return quant::quantize_1x128_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)stream;
    quant::quantize_1x128_cpu(p);
}

void quantize_1x128_transposed(const py::handle& x_obj, const py::handle& q_obj, const py::handle& scale_obj,
                               bool pow2_scale, uintptr_t stream) {
    const char* op = "quantize_1x128_transposed";
    PyTensor x = to_view(x_obj, op, "x", stream), q = to_view(q_obj, op, "q", stream),
             scale = to_view(scale_obj, op, "scale", stream);
    expect_dtype(x.view, op, "x", kFloatTypes);
    expect_runnable(x.view, op, "x");
    K2_CHECK_ARG(x.view.ndim() >= 2, op, "x", "expected at least 2 dims [..., M, K], got ", x.view.describe());
    const quant::RowLayout rows = row_layout(x.view, op, "x");
    const int64_t M = x.view.size(-2), K = x.view.size(-1);
    expect_output(q, x, op, "q", with_last(x.view.shape, {K, M}, 2), kFp8Types);
    expect_output(scale, x, op, "scale", with_last(x.view.shape, {K, cdiv(M, kGroup)}, 2), {DType::Float32});
    if (x.view.numel() == 0) return;
    quant::Quantize1x128TransposedParams p{
        x.view.data,          rows,      q.view.data, static_cast<float*>(scale.view.data),
        batch_of(x.view),     M,         K,           x.view.dtype,
        fmt_of(q.view.dtype), pow2_scale};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (x.view.device == DeviceType::CUDA)
        return quant::quantize_1x128_transposed_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)stream;
    quant::quantize_1x128_transposed_cpu(p);
}

void quantize_128x128(const py::handle& w_obj, const py::handle& q_obj, const py::handle& scale_obj, uintptr_t stream) {
    const char* op = "quantize_128x128";
    PyTensor w = to_view(w_obj, op, "w", stream), q = to_view(q_obj, op, "q", stream),
             scale = to_view(scale_obj, op, "scale_inv", stream);
    expect_dtype(w.view, op, "w", kFloatTypes);
    expect_runnable(w.view, op, "w");
    K2_CHECK_ARG(w.view.ndim() >= 2, op, "w", "expected at least 2 dims [..., M, K], got ", w.view.describe());
    const quant::RowLayout rows = row_layout(w.view, op, "w");
    const int64_t M = w.view.size(-2), K = w.view.size(-1);
    expect_output(q, w, op, "q", w.view.shape, kFp8Types);
    expect_output(scale, w, op, "scale_inv", with_last(w.view.shape, {cdiv(M, kGroup), cdiv(K, kGroup)}, 2),
                  {DType::Float32});
    if (w.view.numel() == 0) return;
    quant::Quantize128x128Params p{w.view.data,         rows, q.view.data, static_cast<float*>(scale.view.data),
                                   batch_of(w.view),    M,    K,           w.view.dtype,
                                   fmt_of(q.view.dtype)};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (w.view.device == DeviceType::CUDA) return quant::quantize_128x128_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)stream;
    quant::quantize_128x128_cpu(p);
}

void dequantize_128x128(const py::handle& q_obj, const py::handle& scale_obj, const py::handle& out_obj,
                        uintptr_t stream) {
    const char* op = "dequantize_128x128";
    PyTensor q = to_view(q_obj, op, "q", stream), scale = to_view(scale_obj, op, "scale_inv", stream),
             out = to_view(out_obj, op, "out", stream);
    expect_dtype(q.view, op, "q", kFp8Types);
    expect_runnable(q.view, op, "q");
    K2_CHECK_ARG(q.view.ndim() >= 2, op, "q", "expected at least 2 dims [..., M, K], got ", q.view.describe());
    const quant::RowLayout rows = row_layout(q.view, op, "q");
    const int64_t M = q.view.size(-2), K = q.view.size(-1);
    expect_output(scale, q, op, "scale_inv", with_last(q.view.shape, {cdiv(M, kGroup), cdiv(K, kGroup)}, 2),
                  {DType::Float32});
    expect_output(out, q, op, "out", q.view.shape, kFloatTypes);
    if (q.view.numel() == 0) return;
    quant::Dequantize128x128Params p{q.view.data,
                                     rows,
                                     static_cast<const float*>(scale.view.data),
                                     out.view.data,
                                     batch_of(q.view),
                                     M,
                                     K,
                                     fmt_of(q.view.dtype),
                                     out.view.dtype};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (q.view.device == DeviceType::CUDA) return quant::dequantize_128x128_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)stream;
    quant::dequantize_128x128_cpu(p);
}

void cast_to_fp8(const py::handle& x_obj, const py::handle& out_obj, uintptr_t stream) {
    const char* op = "cast_to_fp8";
    PyTensor x = to_view(x_obj, op, "x", stream), out = to_view(out_obj, op, "out", stream);
    expect_dtype(x.view, op, "x", {DType::Float32});
    expect_contiguous(x.view, op, "x");
    expect_runnable(x.view, op, "x");
    expect_output(out, x, op, "out", x.view.shape, kFp8Types);
    if (x.view.numel() == 0) return;
    quant::CastParams p{static_cast<const float*>(x.view.data), out.view.data, x.view.numel(), fmt_of(out.view.dtype)};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (x.view.device == DeviceType::CUDA) return quant::cast_to_fp8_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)stream;
    quant::cast_to_fp8_cpu(p);
}

}  // namespace

void register_quant(py::module_& m) {
    add_kernel_family("quant", "cpu");
#ifdef K2_WITH_CUDA
    add_kernel_family("quant", "cuda");
#endif
    m.def("quantize_1x128", &quantize_1x128, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("pow2_scale"),
          py::arg("stream"), "FP8 per-1x128-group quantization of x [..., K] into q [..., K] and scale [..., G].");
    m.def("quantize_1x128_transposed", &quantize_1x128_transposed, py::arg("x"), py::arg("q"), py::arg("scale"),
          py::arg("pow2_scale"), py::arg("stream"),
          "quantize_1x128 of x^T: x [..., M, K] into q [..., K, M] and scale [..., K, ceil(M/128)].");
    m.def("quantize_128x128", &quantize_128x128, py::arg("w"), py::arg("q"), py::arg("scale_inv"), py::arg("stream"),
          "FP8 per-128x128-tile quantization of w [..., M, K] into q and scale_inv [..., ceil(M/128), ceil(K/128)].");
    m.def("dequantize_128x128", &dequantize_128x128, py::arg("q"), py::arg("scale_inv"), py::arg("out"),
          py::arg("stream"), "out = fp32(q) * scale_inv[tile], cast to out's dtype.");
    m.def("cast_to_fp8", &cast_to_fp8, py::arg("x"), py::arg("out"), py::arg("stream"),
          "Plain fp32 -> fp8 cast (torch's rounding and overflow rules), the primitive of the quantize kernels.");
}

}  // namespace k2
