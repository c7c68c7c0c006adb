// Python bindings of the gemm family (CUDA only; on CPU k2.ops runs torch._grouped_mm, see gemm.h): validate
// the views, fill the params struct, launch on the caller's stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "gemm/gemm.h"

namespace py = pybind11;

namespace k2 {

#ifdef K2_WITH_CUDA
namespace {

constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

void expect_cuda(const char* op, std::initializer_list<std::pair<const PyTensor*, const char*>> args) {
    const TensorView& first = args.begin()->first->view;
    for (const auto& [t, name] : args) {
        K2_CHECK_ARG(t->view.device == DeviceType::CUDA, op, name, "expected a CUDA tensor (k2 has no CPU kernel ",
                     "for this op; k2.ops runs torch._grouped_mm on CPU), got ", t->view.describe());
        expect_contiguous(t->view, op, name);
        expect_same_device(first, t->view, op, name);
    }
}

DType float_dtype(const std::string& name, const char* op) {
    const auto dtype = find_dtype(name);
    K2_CHECK_ARG(dtype && (*dtype == DType::Float32 || *dtype == DType::BFloat16 || *dtype == DType::Float16), op,
                 "dtype", "expected 'float32', 'bfloat16' or 'float16', got '", name, "'");
    return *dtype;
}

// Workspace bytes of grouped_gemm / grouped_gemm_wgrad for E groups of `dtype` on (device_type, device).
std::size_t grouped_gemm_workspace_size(const std::string& dtype, int64_t num_groups, const std::string& device_type,
                                        int device) {
    const DType d = float_dtype(dtype, "grouped_gemm_workspace_size");
    K2_CHECK_ARG(num_groups >= 0, "grouped_gemm_workspace_size", "num_groups", "expected >= 0, got ", num_groups);
    if (device_type != "cuda") return 0;
    return gemm::grouped_workspace_size(d, num_groups, device);
}

std::size_t grouped_gemm_fp8_workspace_size(int64_t num_groups, const std::string& device_type, int device) {
    K2_CHECK_ARG(num_groups >= 0, "grouped_gemm_fp8_workspace_size", "num_groups", "expected >= 0, got ", num_groups);
    if (device_type != "cuda") return 0;
    return gemm::grouped_gemm_fp8_workspace_size(num_groups, device);
}

void expect_offsets(const PyTensor& offsets, int64_t groups, const char* op) {
    expect_shape(offsets.view, op, "offsets", {groups});
    expect_dtype(offsets.view, op, "offsets", {DType::Int32});
}

void grouped_gemm(const py::handle& x_obj, const py::handle& w_obj, const py::handle& offsets_obj,
                  const py::handle& out_obj, bool trans_w, const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "grouped_gemm";
    PyTensor x = to_view(x_obj, op, "x", stream), w = to_view(w_obj, op, "w", stream),
             offsets = to_view(offsets_obj, op, "offsets", stream);
    PyTensor out = to_view(out_obj, op, "out", stream);
    expect_ndim(x.view, op, "x", 2);
    expect_ndim(w.view, op, "w", 3);
    expect_dtype(x.view, op, "x", {DType::Float32, DType::BFloat16, DType::Float16});
    expect_dtype(w.view, op, "w", {x.view.dtype});
    const int64_t T = x.view.size(0), K = x.view.size(1), E = w.view.size(0);
    const int64_t N = trans_w ? w.view.size(1) : w.view.size(2);
    K2_CHECK_ARG((trans_w ? w.view.size(2) : w.view.size(1)) == K, op, "w", "expected ",
                 trans_w ? "[E, N, K]" : "[E, K, N]", " with K = ", K, ", got ", w.view.describe());
    K2_CHECK_ARG(T <= kMaxDim && N <= kMaxDim && K <= kMaxDim, op, "x", "sizes must fit int32");
    expect_offsets(offsets, E, op);
    expect_shape(out.view, op, "out", {T, N});
    expect_dtype(out.view, op, "out", {x.view.dtype});
    expect_cuda(op, {{&x, "x"}, {&w, "w"}, {&offsets, "offsets"}, {&out, "out"}});
    PyTensor workspace = to_workspace(workspace_obj, x.view, op, stream);

    gemm::GroupedGemmParams p{};
    p.desc.mode = gemm::GroupedMode::kRows;
    p.desc.trans_w = trans_w;
    p.desc.num_groups = int32_t(E);
    p.desc.offsets = static_cast<const int32_t*>(offsets.view.data);
    p.desc.k = K, p.desc.n = N;
    p.dtype = x.view.dtype, p.a = x.view.data, p.b = w.view.data, p.d = out.view.data, p.total_rows = T;
    p.workspace = as_workspace(workspace);
    py::gil_scoped_release release;
    gemm::grouped_gemm_cuda(p, reinterpret_cast<void*>(stream));
}

void grouped_gemm_wgrad(const py::handle& x_obj, const py::handle& dy_obj, const py::handle& offsets_obj,
                        const py::handle& out_obj, bool trans_w, const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "grouped_gemm_wgrad";
    PyTensor x = to_view(x_obj, op, "x", stream), dy = to_view(dy_obj, op, "dy", stream);
    PyTensor offsets = to_view(offsets_obj, op, "offsets", stream), out = to_view(out_obj, op, "out", stream);
    expect_ndim(x.view, op, "x", 2);
    expect_ndim(dy.view, op, "dy", 2);
    expect_ndim(offsets.view, op, "offsets", 1);
    expect_dtype(x.view, op, "x", {DType::Float32, DType::BFloat16, DType::Float16});
    expect_dtype(dy.view, op, "dy", {x.view.dtype});
    const int64_t T = x.view.size(0), K = x.view.size(1), N = dy.view.size(1), E = offsets.view.size(0);
    K2_CHECK_ARG(dy.view.size(0) == T, op, "dy", "expected ", T, " rows like x, got ", dy.view.describe());
    K2_CHECK_ARG(T <= kMaxDim && N <= kMaxDim && K <= kMaxDim, op, "x", "sizes must fit int32");
    expect_offsets(offsets, E, op);
    expect_shape(out.view, op, "out", trans_w ? std::vector<int64_t>{E, N, K} : std::vector<int64_t>{E, K, N});
    expect_dtype(out.view, op, "out", {x.view.dtype});
    expect_cuda(op, {{&x, "x"}, {&dy, "dy"}, {&offsets, "offsets"}, {&out, "out"}});
    PyTensor workspace = to_workspace(workspace_obj, x.view, op, stream);

    gemm::GroupedGemmParams p{};
    p.desc.mode = gemm::GroupedMode::kWgrad;
    p.desc.trans_w = trans_w;
    p.desc.num_groups = int32_t(E);
    p.desc.offsets = static_cast<const int32_t*>(offsets.view.data);
    p.desc.k = K, p.desc.n = N;
    p.dtype = x.view.dtype, p.d = out.view.data, p.total_rows = T;
    p.a = trans_w ? dy.view.data : x.view.data;
    p.b = trans_w ? x.view.data : dy.view.data;
    p.workspace = as_workspace(workspace);
    py::gil_scoped_release release;
    gemm::grouped_gemm_cuda(p, reinterpret_cast<void*>(stream));
}

void grouped_gemm_fp8(const py::handle& x_obj, const py::handle& x_scale_obj, const py::handle& w_obj,
                      const py::handle& w_scale_obj, const py::handle& offsets_obj, const py::handle& out_obj,
                      const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "grouped_gemm_fp8";
    PyTensor x = to_view(x_obj, op, "x", stream), x_scale = to_view(x_scale_obj, op, "x_scale", stream);
    PyTensor w = to_view(w_obj, op, "w", stream), w_scale = to_view(w_scale_obj, op, "w_scale", stream);
    PyTensor offsets = to_view(offsets_obj, op, "offsets", stream), out = to_view(out_obj, op, "out", stream);
    expect_ndim(x.view, op, "x", 2);
    expect_ndim(w.view, op, "w", 3);
    expect_dtype(x.view, op, "x", {DType::Float8E4M3});
    expect_dtype(w.view, op, "w", {DType::Float8E4M3});
    const int64_t T = x.view.size(0), K = x.view.size(1), E = w.view.size(0), N = w.view.size(1);
    K2_CHECK_ARG(w.view.size(2) == K, op, "w", "expected [E, N, K] with K = ", K, ", got ", w.view.describe());
    K2_CHECK_ARG(K % 16 == 0 && N % 8 == 0, op, "w", "TMA needs K % 16 == 0 and N % 8 == 0, got K = ", K, ", N = ", N);
    K2_CHECK_ARG(T <= kMaxDim && N <= kMaxDim && K <= kMaxDim, op, "x", "sizes must fit int32");
    const int64_t kb = (K + 127) / 128, nb = (N + 127) / 128;
    expect_shape(x_scale.view, op, "x_scale", {T, kb});
    expect_dtype(x_scale.view, op, "x_scale", {DType::Float32});
    expect_shape(w_scale.view, op, "w_scale", {E, nb, kb});
    expect_dtype(w_scale.view, op, "w_scale", {DType::Float32});
    expect_offsets(offsets, E, op);
    expect_shape(out.view, op, "out", {T, N});
    expect_dtype(out.view, op, "out", {DType::BFloat16});
    expect_cuda(
        op, {{&x, "x"}, {&x_scale, "x_scale"}, {&w, "w"}, {&w_scale, "w_scale"}, {&offsets, "offsets"}, {&out, "out"}});
    PyTensor workspace = to_workspace(workspace_obj, x.view, op, stream);

    gemm::GroupedGemmFp8Params p{static_cast<const int32_t*>(offsets.view.data),
                                 int32_t(E),
                                 T,
                                 N,
                                 K,
                                 x.view.data,
                                 static_cast<const float*>(x_scale.view.data),
                                 w.view.data,
                                 static_cast<const float*>(w_scale.view.data),
                                 out.view.data,
                                 as_workspace(workspace)};
    py::gil_scoped_release release;
    gemm::grouped_gemm_fp8_cuda(p, reinterpret_cast<void*>(stream));
}

}  // namespace
#endif  // K2_WITH_CUDA

void register_gemm(py::module_& m) {
#ifdef K2_WITH_CUDA
    add_kernel_family("gemm", "cuda");
    m.def("grouped_gemm", &grouped_gemm, py::arg("x"), py::arg("w"), py::arg("offsets"), py::arg("out"),
          py::arg("trans_w"), py::arg("workspace"), py::arg("stream"),
          "out[rows of group e] = x[rows of e] @ W_e (CUTLASS grouped GEMM; offsets stay on the device).");
    m.def("grouped_gemm_wgrad", &grouped_gemm_wgrad, py::arg("x"), py::arg("dy"), py::arg("offsets"), py::arg("out"),
          py::arg("trans_w"), py::arg("workspace"), py::arg("stream"),
          "dW_e = x_e^T dy_e over each group's rows (zeros for empty groups).");
    m.def("grouped_gemm_workspace_size", &grouped_gemm_workspace_size, py::arg("dtype"), py::arg("num_groups"),
          py::arg("device_type"), py::arg("device"),
          "Workspace bytes (a uint8 tensor) grouped_gemm and grouped_gemm_wgrad need for E groups on that device; "
          "0 for float32/float16 (CUDA-core kernel) and on CPU.");
    m.def("grouped_gemm_fp8", &grouped_gemm_fp8, py::arg("x"), py::arg("x_scale"), py::arg("w"), py::arg("w_scale"),
          py::arg("offsets"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
          "FP8 grouped GEMM with 1x128 activation and 128x128 weight scales (sm_90a).");
    m.def("grouped_gemm_fp8_workspace_size", &grouped_gemm_fp8_workspace_size, py::arg("num_groups"),
          py::arg("device_type"), py::arg("device"), "Workspace bytes grouped_gemm_fp8 needs for E groups.");
    m.def("grouped_gemm_fp8_supported", &gemm::fp8_supported, py::arg("device"),
          "Whether grouped_gemm_fp8 runs on this CUDA device (sm_90 and a build with sm_90a kernels).");
#else
    (void)m;
#endif
}

}  // namespace k2
