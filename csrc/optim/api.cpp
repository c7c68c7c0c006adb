// Python bindings of the optim family: k2._C.newton_schulz (CUDA only; on CPU k2.ops uses torch's GEMMs).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "optim/optim.h"

namespace py = pybind11;

namespace k2 {

#ifdef K2_WITH_CUDA
namespace {

void newton_schulz(const py::handle& x_obj, const py::handle& out_obj, const std::vector<float>& coefficients,
                   float eps, const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "newton_schulz";
    PyTensor x = to_view(x_obj, op, "x", stream), out = to_view(out_obj, op, "out", stream);
    K2_CHECK_ARG(x.view.ndim() >= 2, op, "x", "expected [..., m, n], got ", x.view.describe());
    expect_dtype(x.view, op, "x", {DType::Float32, DType::BFloat16, DType::Float16});
    expect_dtype(out.view, op, "out", {DType::Float32, DType::BFloat16, DType::Float16});
    expect_shape(out.view, op, "out", x.view.shape);
    for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&out, "out"}}) {
        K2_CHECK_ARG(t->view.device == DeviceType::CUDA, op, name, "expected a CUDA tensor, got ", t->view.describe());
        expect_contiguous(t->view, op, name);
    }
    expect_same_device(x.view, out.view, op, "out");
    PyTensor workspace = to_workspace(workspace_obj, x.view, op, stream);
    K2_CHECK_ARG(!coefficients.empty() && coefficients.size() % 3 == 0, op, "coefficients",
                 "expected 3 values (a, b, c) per step, got ", coefficients.size());
    K2_CHECK_ARG(eps > 0, op, "eps", "expected > 0, got ", eps);
    const int64_t m = x.view.size(-2), n = x.view.size(-1);
    const int64_t batch = m * n == 0 ? 0 : x.view.numel() / (m * n);
    constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
    K2_CHECK_ARG(m <= kMax && n <= kMax && batch <= kMax, op, "x", "sizes must fit int32");

    optim::NewtonSchulzParams p{x.view.data, out.view.data, x.view.dtype, out.view.dtype,         batch, m,
                                n,           coefficients,  eps,          as_workspace(workspace)};
    py::gil_scoped_release release;
    optim::newton_schulz_cuda(p, reinterpret_cast<void*>(stream));
}

// Workspace bytes of newton_schulz for `batch` matrices [m, n] on (device_type, device); 0 on CPU.
std::size_t newton_schulz_workspace_size(int64_t batch, int64_t m, int64_t n, const std::string& device_type,
                                         int device) {
    const char* op = "newton_schulz_workspace_size";
    K2_CHECK_ARG(batch >= 0 && m >= 0 && n >= 0, op, "batch", "expected sizes >= 0, got ", batch, ", ", m, ", ", n);
    if (device_type != "cuda") return 0;
    return optim::newton_schulz_workspace_size(batch, m, n, device);
}

}  // namespace
#endif  // K2_WITH_CUDA

void register_optim(py::module_& m) {
#ifdef K2_WITH_CUDA
    add_kernel_family("optim", "cuda");
    m.def("newton_schulz", &newton_schulz, py::arg("x"), py::arg("out"), py::arg("coefficients"), py::arg("eps"),
          py::arg("workspace"), py::arg("stream"),
          "Batched bf16 Newton-Schulz: 3 GEMMs per (a, b, c) step, the polynomial folded into their epilogues.");
    m.def("newton_schulz_workspace_size", &newton_schulz_workspace_size, py::arg("batch"), py::arg("m"), py::arg("n"),
          py::arg("device_type"), py::arg("device"),
          "Workspace bytes (a uint8 tensor) newton_schulz needs for `batch` matrices [m, n] on that device.");
#else
    (void)m;
#endif
}

}  // namespace k2
