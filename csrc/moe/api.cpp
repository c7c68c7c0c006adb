// Python bindings of the moe family: validate the views, fill the params struct, run the CPU or CUDA kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "moe/moe.h"

namespace py = pybind11;

namespace k2 {

namespace {

const std::initializer_list<DType> kFloatTypes = {DType::Float32, DType::BFloat16, DType::Float16};

// Checks every view is contiguous and on the first one's device; returns whether that device is CUDA.
bool common_device(const char* op, std::initializer_list<std::pair<const PyTensor*, const char*>> args) {
    const TensorView& first = args.begin()->first->view;
    for (const auto& [t, name] : args) {
        expect_contiguous(t->view, op, name);
        expect_same_device(first, t->view, op, name);
        expect_device_supported(t->view, op, name, kHasCuda);
    }
    return first.device == DeviceType::CUDA;
}

void moe_permute(const py::handle& x_obj, const py::handle& ids_obj, const py::handle& x_sorted_obj,
                 const py::handle& row_map_obj, const py::handle& offsets_obj, const py::handle& workspace_obj,
                 uintptr_t stream) {
    const char* op = "moe_permute";
    PyTensor x = to_view(x_obj, op, "x", stream), ids = to_view(ids_obj, op, "topk_ids", stream);
    PyTensor x_sorted = to_view(x_sorted_obj, op, "x_sorted", stream),
             row_map = to_view(row_map_obj, op, "row_map", stream);
    PyTensor offsets = to_view(offsets_obj, op, "offsets", stream);
    expect_ndim(x.view, op, "x", 2);
    expect_ndim(ids.view, op, "topk_ids", 2);
    expect_dtype(x.view, op, "x", kFloatTypes);
    expect_dtype(ids.view, op, "topk_ids", {DType::Int32, DType::Int64});
    const int64_t T = x.view.size(0), D = x.view.size(1), K = ids.view.size(1);
    K2_CHECK_ARG(ids.view.size(0) == T, op, "topk_ids", "expected ", T, " rows (one per token), got ",
                 ids.view.describe());
    K2_CHECK_ARG(T * K < (int64_t(1) << 31), op, "topk_ids", "T*K must fit int32, got ", T * K);
    expect_shape(x_sorted.view, op, "x_sorted", {T * K, D});
    expect_dtype(x_sorted.view, op, "x_sorted", {x.view.dtype});
    expect_shape(row_map.view, op, "row_map", {T * K});
    expect_dtype(row_map.view, op, "row_map", {DType::Int32});
    expect_ndim(offsets.view, op, "offsets", 1);
    expect_dtype(offsets.view, op, "offsets", {DType::Int32});
    K2_CHECK_ARG(offsets.view.size(0) >= 1, op, "offsets", "expected at least one expert");
    const bool cuda = common_device(
        op, {{&x, "x"}, {&ids, "topk_ids"}, {&x_sorted, "x_sorted"}, {&row_map, "row_map"}, {&offsets, "offsets"}});
    PyTensor workspace = to_workspace(workspace_obj, x.view, op, stream);

    moe::PermuteParams p{x.view.data,
                         ids.view.data,
                         x_sorted.view.data,
                         static_cast<int32_t*>(row_map.view.data),
                         static_cast<int32_t*>(offsets.view.data),
                         T,
                         K,
                         D,
                         offsets.view.size(0),
                         x.view.dtype,
                         ids.view.dtype == DType::Int64,
                         as_workspace(workspace)};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (cuda) return moe::permute_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)cuda, (void)stream;
    moe::permute_cpu(p);
}

void moe_unpermute(const py::handle& y_sorted_obj, const py::handle& row_map_obj, const py::handle& weights_obj,
                   const py::handle& y_obj, const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "moe_unpermute";
    PyTensor y_sorted = to_view(y_sorted_obj, op, "y_sorted", stream),
             row_map = to_view(row_map_obj, op, "row_map", stream);
    PyTensor weights = to_view(weights_obj, op, "topk_weights", stream), y = to_view(y_obj, op, "y", stream);
    expect_ndim(weights.view, op, "topk_weights", 2);
    expect_dtype(weights.view, op, "topk_weights", kFloatTypes);
    expect_ndim(y_sorted.view, op, "y_sorted", 2);
    expect_dtype(y_sorted.view, op, "y_sorted", kFloatTypes);
    const int64_t T = weights.view.size(0), K = weights.view.size(1), D = y_sorted.view.size(1);
    expect_shape(y_sorted.view, op, "y_sorted", {T * K, D});
    expect_shape(row_map.view, op, "row_map", {T * K});
    expect_dtype(row_map.view, op, "row_map", {DType::Int32});
    expect_shape(y.view, op, "y", {T, D});
    expect_dtype(y.view, op, "y", {y_sorted.view.dtype});
    const bool cuda =
        common_device(op, {{&y_sorted, "y_sorted"}, {&row_map, "row_map"}, {&weights, "topk_weights"}, {&y, "y"}});
    PyTensor workspace = to_workspace(workspace_obj, y_sorted.view, op, stream);

    moe::UnpermuteParams p{y_sorted.view.data,
                           static_cast<const int32_t*>(row_map.view.data),
                           weights.view.data,
                           y.view.data,
                           T,
                           K,
                           D,
                           y_sorted.view.dtype,
                           weights.view.dtype,
                           as_workspace(workspace)};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (cuda) return moe::unpermute_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)cuda, (void)stream;
    moe::unpermute_cpu(p);
}

void moe_unpermute_backward(const py::handle& dy_obj, const py::handle& y_sorted_obj, const py::handle& row_map_obj,
                            const py::handle& weights_obj, const py::handle& dy_sorted_obj,
                            const py::handle& dweights_obj, uintptr_t stream) {
    const char* op = "moe_unpermute_backward";
    PyTensor dy = to_view(dy_obj, op, "dy", stream), y_sorted = to_view(y_sorted_obj, op, "y_sorted", stream);
    PyTensor row_map = to_view(row_map_obj, op, "row_map", stream),
             weights = to_view(weights_obj, op, "topk_weights", stream);
    PyTensor dy_sorted = to_view(dy_sorted_obj, op, "dy_sorted", stream),
             dweights = to_view(dweights_obj, op, "dweights", stream);
    expect_ndim(weights.view, op, "topk_weights", 2);
    expect_dtype(weights.view, op, "topk_weights", kFloatTypes);
    expect_ndim(y_sorted.view, op, "y_sorted", 2);
    expect_dtype(y_sorted.view, op, "y_sorted", kFloatTypes);
    const int64_t T = weights.view.size(0), K = weights.view.size(1), D = y_sorted.view.size(1);
    expect_shape(y_sorted.view, op, "y_sorted", {T * K, D});
    expect_shape(dy.view, op, "dy", {T, D});
    expect_dtype(dy.view, op, "dy", {y_sorted.view.dtype});
    expect_shape(row_map.view, op, "row_map", {T * K});
    expect_dtype(row_map.view, op, "row_map", {DType::Int32});
    expect_shape(dy_sorted.view, op, "dy_sorted", {T * K, D});
    expect_dtype(dy_sorted.view, op, "dy_sorted", {y_sorted.view.dtype});
    expect_shape(dweights.view, op, "dweights", {T, K});
    expect_dtype(dweights.view, op, "dweights", {weights.view.dtype});
    const bool cuda = common_device(op, {{&dy, "dy"},
                                         {&y_sorted, "y_sorted"},
                                         {&row_map, "row_map"},
                                         {&weights, "topk_weights"},
                                         {&dy_sorted, "dy_sorted"},
                                         {&dweights, "dweights"}});

    moe::UnpermuteBackwardParams p{dy.view.data,
                                   y_sorted.view.data,
                                   static_cast<const int32_t*>(row_map.view.data),
                                   weights.view.data,
                                   dy_sorted.view.data,
                                   dweights.view.data,
                                   T,
                                   K,
                                   D,
                                   y_sorted.view.dtype,
                                   weights.view.dtype};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (cuda) return moe::unpermute_backward_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)cuda, (void)stream;
    moe::unpermute_backward_cpu(p);
}

bool on_cuda(const std::string& device_type, const char* op) {
    K2_CHECK_ARG(device_type == "cpu" || device_type == "cuda", op, "device_type", "expected 'cpu' or 'cuda', got '",
                 device_type, "'");
    return device_type == "cuda";
}

// Workspace bytes of moe_permute / moe_unpermute on (device_type, device); the CPU kernels need none.
std::size_t moe_permute_workspace_size(int64_t num_tokens, int64_t top_k, int64_t num_experts,
                                       const std::string& device_type, int device) {
    const char* op = "moe_permute_workspace_size";
    K2_CHECK_ARG(num_tokens >= 0 && top_k >= 0 && num_experts >= 0, op, "num_tokens", "expected sizes >= 0");
    if (!on_cuda(device_type, op)) return 0;
#ifdef K2_WITH_CUDA
    return moe::permute_workspace_size(num_tokens, top_k, num_experts, device);
#else
    (void)device;
    throw UnsupportedError("k2.ops.moe_permute: this build of k2 has no CUDA kernels");
#endif
}

std::size_t moe_unpermute_workspace_size(int64_t num_tokens, int64_t top_k, const std::string& device_type,
                                         int device) {
    const char* op = "moe_unpermute_workspace_size";
    K2_CHECK_ARG(num_tokens >= 0 && top_k >= 0, op, "num_tokens", "expected sizes >= 0");
    (void)device;
    return on_cuda(device_type, op) ? moe::unpermute_workspace_size(num_tokens, top_k) : 0;
}

}  // namespace

void register_moe(py::module_& m) {
    add_kernel_family("moe", "cpu");
#ifdef K2_WITH_CUDA
    add_kernel_family("moe", "cuda");
#endif
    m.def("moe_permute", &moe_permute, py::arg("x"), py::arg("topk_ids"), py::arg("x_sorted"), py::arg("row_map"),
          py::arg("offsets"), py::arg("workspace"), py::arg("stream"),
          "Stable counting sort of token copies by expert: fills x_sorted [T*K, D], row_map [T*K], offsets [E].");
    m.def("moe_permute_workspace_size", &moe_permute_workspace_size, py::arg("num_tokens"), py::arg("top_k"),
          py::arg("num_experts"), py::arg("device_type"), py::arg("device"),
          "Workspace bytes (a uint8 tensor) moe_permute needs; 0 on CPU.");
    m.def("moe_unpermute", &moe_unpermute, py::arg("y_sorted"), py::arg("row_map"), py::arg("topk_weights"),
          py::arg("y"), py::arg("workspace"), py::arg("stream"),
          "y[t] = sum_k w[t, k] * y_sorted[pos(t, k)] (fp32 accumulation).");
    m.def("moe_unpermute_workspace_size", &moe_unpermute_workspace_size, py::arg("num_tokens"), py::arg("top_k"),
          py::arg("device_type"), py::arg("device"),
          "Workspace bytes moe_unpermute needs: the int32 inverse permutation on CUDA, 0 on CPU.");
    m.def("moe_unpermute_backward", &moe_unpermute_backward, py::arg("dy"), py::arg("y_sorted"), py::arg("row_map"),
          py::arg("topk_weights"), py::arg("dy_sorted"), py::arg("dweights"), py::arg("stream"),
          "Gradients of moe_unpermute: dy_sorted [T*K, D] and dweights [T, K].");
}

}  // namespace k2
