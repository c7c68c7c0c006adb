// Python bindings of the attention family: validate the views, fill the params struct, run the CPU or CUDA kernel
// (the CUDA kernels exist when the build has CUDA; without them a CUDA tensor is refused with UnsupportedError).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "attention/attention.h"
#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "common/thread_pool.h"

namespace py = pybind11;

namespace k2 {

namespace {

// A [T, H, d] view: 3-D, fp32 or bf16, unit stride along d.
void expect_head_tensor(const TensorView& t, const char* op, const char* arg) {
    expect_ndim(t, op, arg, 3);
    expect_dtype(t, op, arg, {DType::Float32, DType::BFloat16});
    K2_CHECK_ARG(t.size(2) <= 1 || t.stride(2) == 1, op, arg, "expected a contiguous last dim, got ", t.describe());
}

attention::HeadTensor head_in(const PyTensor& t) {
    return {t.view.data, t.view.stride(0), t.view.stride(1)};
}
attention::MutableHeadTensor head_out(const PyTensor& t) {
    return {t.view.data, t.view.stride(0), t.view.stride(1)};
}

// Checks every view is on the first one's device and that the family has a kernel there; returns whether it is CUDA.
bool common_device(const char* op, std::initializer_list<std::pair<const PyTensor*, const char*>> args) {
    const TensorView& first = args.begin()->first->view;
    for (const auto& [t, name] : args) {
        expect_same_device(first, t->view, op, name);
        expect_device_supported(t->view, op, name, kHasCuda);
    }
    return first.device == DeviceType::CUDA;
}

// cu_seqlens: None (one document) or int32 [N+1] on q's device; returns its data (or null) and N.
std::pair<const int32_t*, int64_t> documents(const py::handle& obj, PyTensor& holder, const TensorView& q,
                                             const char* op, uintptr_t stream) {
    if (obj.is_none()) return {nullptr, 1};
    holder = to_view(obj, op, "cu_seqlens", stream);
    expect_ndim(holder.view, op, "cu_seqlens", 1);
    expect_dtype(holder.view, op, "cu_seqlens", {DType::Int32});
    expect_contiguous(holder.view, op, "cu_seqlens");
    expect_same_device(q, holder.view, op, "cu_seqlens");
    K2_CHECK_ARG(holder.view.size(0) >= 1, op, "cu_seqlens", "expected N+1 >= 1 offsets, got none");
    return {static_cast<const int32_t*>(holder.view.data), holder.view.size(0) - 1};
}

void mla_attention_forward(const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj,
                           const py::handle& cu_obj, const py::handle& o_obj, const py::handle& lse_obj,
                           const py::handle& max_obj, double softmax_scale, bool causal,
                           const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "mla_attention";
    PyTensor q = to_view(q_obj, op, "q", stream), k = to_view(k_obj, op, "k", stream),
             v = to_view(v_obj, op, "v", stream), o = to_view(o_obj, op, "o", stream);
    PyTensor lse = to_view(lse_obj, op, "lse", stream), max_logits = to_view(max_obj, op, "max_logits", stream), cu;
    expect_head_tensor(q.view, op, "q");
    const int64_t T = q.view.size(0), H = q.view.size(1), dqk = q.view.size(2);
    expect_head_tensor(k.view, op, "k");
    expect_shape(k.view, op, "k", {T, H, dqk});
    expect_head_tensor(v.view, op, "v");
    const int64_t dv = v.view.size(2);
    expect_shape(v.view, op, "v", {T, H, dv});
    expect_head_tensor(o.view, op, "o");
    expect_shape(o.view, op, "o", {T, H, dv});
    for (const auto& [t, name] :
         std::initializer_list<std::pair<const PyTensor*, const char*>>{{&k, "k"}, {&v, "v"}, {&o, "o"}})
        expect_dtype(t->view, op, name, {q.view.dtype});
    K2_CHECK_ARG(H >= 1 && dqk >= 1 && dv >= 1, op, "q", "expected H, dqk, dv >= 1, got q ", q.view.describe(),
                 " and v ", v.view.describe());
    K2_CHECK_ARG(T < (int64_t(1) << 31), op, "q", "expected fewer than 2^31 tokens, got ", T);
    expect_shape(lse.view, op, "lse", {H, T});
    expect_dtype(lse.view, op, "lse", {DType::Float32});
    expect_contiguous(lse.view, op, "lse");
    expect_ndim(max_logits.view, op, "max_logits", 1);
    expect_dtype(max_logits.view, op, "max_logits", {DType::Float32});
    K2_CHECK_ARG(max_logits.view.size(0) == H || max_logits.view.size(0) == 0, op, "max_logits", "expected [H] = [", H,
                 "] or [0] (not requested), got ", max_logits.view.describe());
    const auto [cu_data, num_docs] = documents(cu_obj, cu, q.view, op, stream);
    const bool cuda =
        common_device(op, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&o, "o"}, {&lse, "lse"}, {&max_logits, "max_logits"}});
    PyTensor workspace = to_workspace(workspace_obj, q.view, op, stream);

    attention::ForwardParams p{head_in(q),
                               head_in(k),
                               head_in(v),
                               head_out(o),
                               static_cast<float*>(lse.view.data),
                               max_logits.view.size(0) ? static_cast<float*>(max_logits.view.data) : nullptr,
                               cu_data,
                               num_docs,
                               T,
                               H,
                               dqk,
                               dv,
                               static_cast<float>(softmax_scale),
                               causal,
                               q.view.dtype,
                               as_workspace(workspace)};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (cuda) return attention::forward_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)cuda;
    attention::forward_cpu(p);
}

void mla_attention_backward(const py::handle& do_obj, const py::handle& q_obj, const py::handle& k_obj,
                            const py::handle& v_obj, const py::handle& o_obj, const py::handle& lse_obj,
                            const py::handle& cu_obj, const py::handle& dq_obj, const py::handle& dk_obj,
                            const py::handle& dv_obj, double softmax_scale, bool causal,
                            const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "mla_attention_backward";
    PyTensor d_o = to_view(do_obj, op, "do", stream), q = to_view(q_obj, op, "q", stream),
             k = to_view(k_obj, op, "k", stream), v = to_view(v_obj, op, "v", stream),
             o = to_view(o_obj, op, "o", stream), lse = to_view(lse_obj, op, "lse", stream);
    PyTensor dq = to_view(dq_obj, op, "dq", stream), dk = to_view(dk_obj, op, "dk", stream),
             dv = to_view(dv_obj, op, "dv", stream), cu;
    expect_head_tensor(q.view, op, "q");
    const int64_t T = q.view.size(0), H = q.view.size(1), dqk = q.view.size(2);
    expect_head_tensor(v.view, op, "v");
    const int64_t dvd = v.view.size(2);
    K2_CHECK_ARG(H >= 1 && dqk >= 1 && dvd >= 1, op, "q", "expected H, dqk, dv >= 1, got q ", q.view.describe(),
                 " and v ", v.view.describe());
    K2_CHECK_ARG(T < (int64_t(1) << 31), op, "q", "expected fewer than 2^31 tokens, got ", T);
    using Expected = std::tuple<const PyTensor*, const char*, int64_t>;  // tensor, name, last dim
    for (const auto& [t, name, d] : std::initializer_list<Expected>{{&k, "k", dqk},
                                                                    {&dq, "dq", dqk},
                                                                    {&dk, "dk", dqk},
                                                                    {&v, "v", dvd},
                                                                    {&o, "o", dvd},
                                                                    {&d_o, "do", dvd},
                                                                    {&dv, "dv", dvd}}) {
        expect_head_tensor(t->view, op, name);
        expect_shape(t->view, op, name, {T, H, d});
        expect_dtype(t->view, op, name, {q.view.dtype});
    }
    expect_shape(lse.view, op, "lse", {H, T});
    expect_dtype(lse.view, op, "lse", {DType::Float32});
    expect_contiguous(lse.view, op, "lse");
    const auto [cu_data, num_docs] = documents(cu_obj, cu, q.view, op, stream);
    const bool cuda = common_device(op, {{&d_o, "do"},
                                         {&q, "q"},
                                         {&k, "k"},
                                         {&v, "v"},
                                         {&o, "o"},
                                         {&lse, "lse"},
                                         {&dq, "dq"},
                                         {&dk, "dk"},
                                         {&dv, "dv"}});
    PyTensor workspace = to_workspace(workspace_obj, q.view, op, stream);

    attention::BackwardParams p{head_in(d_o),
                                head_in(q),
                                head_in(k),
                                head_in(v),
                                head_in(o),
                                static_cast<const float*>(lse.view.data),
                                head_out(dq),
                                head_out(dk),
                                head_out(dv),
                                cu_data,
                                num_docs,
                                T,
                                H,
                                dqk,
                                dvd,
                                static_cast<float>(softmax_scale),
                                causal,
                                q.view.dtype,
                                as_workspace(workspace)};
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    if (cuda) return attention::backward_cuda(p, reinterpret_cast<void*>(stream));
#endif
    (void)cuda;
    attention::backward_cpu(p);
}

// Whether a workspace query is for CUDA; throws for an unknown device type, or CUDA in a build without CUDA kernels.
bool on_cuda(const std::string& device_type, const char* op) {
    K2_CHECK_ARG(device_type == "cpu" || device_type == "cuda", op, "device_type", "expected 'cpu' or 'cuda', got '",
                 device_type, "'");
    if (device_type == "cuda" && !kHasCuda)
        throw UnsupportedError(detail::concat("k2.ops.", op, ": this build of k2 has no CUDA attention kernel"));
    return device_type == "cuda";
}

void expect_sizes(int64_t tokens, int64_t heads, int64_t head_dim_qk, int64_t head_dim_v, int64_t num_docs,
                  const char* op) {
    K2_CHECK_ARG(tokens >= 0 && heads >= 1 && head_dim_qk >= 1 && head_dim_v >= 1 && num_docs >= 0, op, "tokens",
                 "expected T >= 0, H >= 1, dqk >= 1, dv >= 1, N >= 0, got ", tokens, ", ", heads, ", ", head_dim_qk,
                 ", ", head_dim_v, ", ", num_docs);
}

std::size_t forward_workspace_size(int64_t tokens, int64_t heads, int64_t head_dim_qk, int64_t head_dim_v,
                                   int64_t num_docs, bool max_logits, const std::string& device_type, int device) {
    const char* op = "mla_attention_forward_workspace_size";
    expect_sizes(tokens, heads, head_dim_qk, head_dim_v, num_docs, op);
    (void)device;
    if (on_cuda(device_type, op)) return 0;  // the CUDA forward reduces max logits with atomics, in place
    return attention::forward_workspace_cpu(tokens, heads, head_dim_qk, head_dim_v, num_docs, max_logits).plan.total;
}

std::size_t backward_workspace_size(int64_t tokens, int64_t heads, int64_t head_dim_qk, int64_t head_dim_v,
                                    int64_t num_docs, const std::string& device_type, int device) {
    const char* op = "mla_attention_backward_workspace_size";
    expect_sizes(tokens, heads, head_dim_qk, head_dim_v, num_docs, op);
    (void)device;
    if (on_cuda(device_type, op)) return attention::backward_workspace_cuda(tokens, heads, head_dim_qk).plan.total;
    return attention::backward_workspace_cpu(tokens, heads, head_dim_qk, head_dim_v, num_docs, num_threads())
        .plan.total;
}

}  // namespace

void register_attention(py::module_& m) {
    add_kernel_family("attention", "cpu");
#ifdef K2_WITH_CUDA
    add_kernel_family("attention", "cuda");
#endif
    m.def("mla_attention_forward", &mla_attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("cu_seqlens").none(true), py::arg("o"), py::arg("lse"), py::arg("max_logits"),
          py::arg("softmax_scale"), py::arg("causal"), py::arg("workspace"), py::arg("stream"),
          "Attention over packed documents: fills o [T, H, dv], lse [H, T] fp32 and, unless it is empty, "
          "max_logits [H] fp32.");
    m.def("mla_attention_forward_workspace_size", &forward_workspace_size, py::arg("tokens"), py::arg("heads"),
          py::arg("head_dim_qk"), py::arg("head_dim_v"), py::arg("num_docs"), py::arg("max_logits"),
          py::arg("device_type"), py::arg("device"),
          "Workspace bytes mla_attention_forward needs: on CPU packed fp32 K^T and V, and the row maxima [H, T] fp32 "
          "when max logits are asked for (linear in T); none on CUDA.");
    m.def("mla_attention_backward", &mla_attention_backward, py::arg("do"), py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("o"), py::arg("lse"), py::arg("cu_seqlens").none(true), py::arg("dq"), py::arg("dk"), py::arg("dv"),
          py::arg("softmax_scale"), py::arg("causal"), py::arg("workspace"), py::arg("stream"),
          "Gradients of mla_attention_forward's o (recomputed from lse): fills dq, dk, dv.");
    m.def("mla_attention_backward_workspace_size", &backward_workspace_size, py::arg("tokens"), py::arg("heads"),
          py::arg("head_dim_qk"), py::arg("head_dim_v"), py::arg("num_docs"), py::arg("device_type"), py::arg("device"),
          "Workspace bytes mla_attention_backward needs: D [H, T] and the fp32 dq accumulators, plus on CPU packed "
          "fp32 Q and dO (by token and transposed by block); linear in T.");
}

}  // namespace k2
