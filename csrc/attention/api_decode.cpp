// Python bindings of absorbed-MLA decode (family "attention_decode"): validate the views, fill DecodeParams, run the
// CPU or CUDA kernel. A family of its own so that k2.ops can tell which devices have a decode kernel independently of
// the training attention.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

#include "attention/decode.h"
#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "common/thread_pool.h"

namespace py = pybind11;

namespace k2 {

namespace {

// A 3-D fp32 or bf16 view with unit stride along its last dim.
void expect_rows(const TensorView& t, const char* op, const char* arg) {
    expect_ndim(t, op, arg, 3);
    expect_dtype(t, op, arg, {DType::Float32, DType::BFloat16});
    K2_CHECK_ARG(t.size(2) <= 1 || t.stride(2) == 1, op, arg, "expected a contiguous last dim, got ", t.describe());
}

bool on_cuda(const std::string& device_type, const char* op) {
    K2_CHECK_ARG(device_type == "cpu" || device_type == "cuda", op, "device_type", "expected 'cpu' or 'cuda', got '",
                 device_type, "'");
    return device_type == "cuda";
}

void mla_decode(const py::handle& q_obj, const py::handle& cache_obj, const py::handle& lengths_obj,
                const py::handle& o_obj, const py::handle& lse_obj, double softmax_scale, int64_t kv_lora_rank,
                const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "mla_decode";
    PyTensor q = to_view(q_obj, op, "q_latent", stream), cache = to_view(cache_obj, op, "cache", stream),
             lengths = to_view(lengths_obj, op, "lengths", stream), o = to_view(o_obj, op, "o", stream),
             lse = to_view(lse_obj, op, "lse", stream);
    expect_rows(q.view, op, "q_latent");
    const int64_t B = q.view.size(0), H = q.view.size(1), D = q.view.size(2), r = kv_lora_rank;
    K2_CHECK_ARG(H >= 1, op, "q_latent", "expected H >= 1, got ", q.view.describe());
    K2_CHECK_ARG(r >= 1 && r <= D, op, "kv_lora_rank", "expected 1 <= kv_lora_rank <= r + dr = ", D, ", got ", r);
    expect_rows(cache.view, op, "cache");
    const int64_t T_max = cache.view.size(1);
    expect_shape(cache.view, op, "cache", {B, T_max, D});
    expect_dtype(cache.view, op, "cache", {q.view.dtype});
    expect_shape(lengths.view, op, "lengths", {B});
    expect_dtype(lengths.view, op, "lengths", {DType::Int32});
    expect_contiguous(lengths.view, op, "lengths");
    expect_rows(o.view, op, "o");
    expect_shape(o.view, op, "o", {B, H, r});
    expect_dtype(o.view, op, "o", {q.view.dtype});
    expect_shape(lse.view, op, "lse", {B, H});
    expect_dtype(lse.view, op, "lse", {DType::Float32});
    expect_contiguous(lse.view, op, "lse");
    for (const auto& [t, name] : std::initializer_list<std::pair<const PyTensor*, const char*>>{
             {&q, "q_latent"}, {&cache, "cache"}, {&lengths, "lengths"}, {&o, "o"}, {&lse, "lse"}}) {
        expect_same_device(q.view, t->view, op, name);
        expect_device_supported(t->view, op, name, kHasCuda);
    }
    const bool cuda = q.view.device == DeviceType::CUDA;
    if (cuda)
        K2_CHECK_ARG(D <= attention::kDecodeCudaMaxDim && r <= attention::kDecodeCudaMaxRank && B <= 65535, op,
                     "q_latent", "the CUDA kernel takes r + dr <= ", attention::kDecodeCudaMaxDim,
                     ", kv_lora_rank <= ", attention::kDecodeCudaMaxRank, " and B <= 65535, got ", q.view.describe());
    PyTensor workspace = to_workspace(workspace_obj, q.view, op, stream);

    attention::DecodeParams p{q.view.data,
                              q.view.stride(0),
                              q.view.stride(1),
                              cache.view.data,
                              cache.view.stride(0),
                              cache.view.stride(1),
                              static_cast<const int32_t*>(lengths.view.data),
                              o.view.data,
                              o.view.stride(0),
                              o.view.stride(1),
                              static_cast<float*>(lse.view.data),
                              B,
                              H,
                              T_max,
                              r,
                              D - r,
                              static_cast<float>(softmax_scale),
                              q.view.dtype,
                              as_workspace(workspace)};
#ifdef K2_WITH_CUDA
    if (cuda) {
        const int64_t splits = attention::decode_splits_cuda(B, H, T_max, q.view.device_index);
        py::gil_scoped_release release;
        return attention::decode_cuda(p, splits, reinterpret_cast<void*>(stream));
    }
#endif
    (void)cuda;
    py::gil_scoped_release release;
    attention::decode_cpu(p);
}

std::size_t mla_decode_workspace_size(int64_t batch, int64_t heads, int64_t kv_lora_rank, int64_t max_len,
                                      const std::string& device_type, int device) {
    const char* op = "mla_decode_workspace_size";
    K2_CHECK_ARG(batch >= 0 && heads >= 1 && kv_lora_rank >= 1 && max_len >= 0, op, "batch",
                 "expected B >= 0, H >= 1, kv_lora_rank >= 1, T_max >= 0, got ", batch, ", ", heads, ", ", kv_lora_rank,
                 ", ", max_len);
    if (!on_cuda(device_type, op))
        return attention::decode_workspace_cpu(batch, heads, kv_lora_rank, max_len, num_threads());
#ifdef K2_WITH_CUDA
    const int64_t splits = attention::decode_splits_cuda(batch, heads, max_len, device);
    return attention::decode_workspace_cuda(batch, heads, kv_lora_rank, splits).total;
#else
    (void)device;
    throw UnsupportedError("k2.ops.mla_decode: this build of k2 has no CUDA kernels");
#endif
}

}  // namespace

void register_attention_decode(py::module_& m) {
    add_kernel_family("attention_decode", "cpu");
#ifdef K2_WITH_CUDA
    add_kernel_family("attention_decode", "cuda");
#endif
    m.def(
        "mla_decode", &mla_decode, py::arg("q_latent"), py::arg("cache"), py::arg("lengths"), py::arg("o"),
        py::arg("lse"), py::arg("softmax_scale"), py::arg("kv_lora_rank"), py::arg("workspace"), py::arg("stream"),
        "Absorbed-MLA decode over the latent cache: fills o [B, H, r] and lse [B, H] fp32 from q_latent [B, H, r+dr], "
        "cache [B, T_max, r+dr] and lengths [B] int32.");
    m.def("mla_decode_workspace_size", &mla_decode_workspace_size, py::arg("batch"), py::arg("heads"),
          py::arg("kv_lora_rank"), py::arg("max_len"), py::arg("device_type"), py::arg("device"),
          "Workspace bytes mla_decode needs: the fp32 partial (o, lse) of every key split (0 when nothing is split).");
}

}  // namespace k2
