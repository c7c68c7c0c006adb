// Python bindings of the comm family: NCCL loading and communicators, and the expert-parallel dispatch/combine
// (pack kernel, NCCL exchange, unpack/combine kernel on the caller's stream). See comm.h for the contract and
// k2/ops/_nccl.py for the Python side (unique id broadcast, buffer allocation, count exchange).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "comm/comm.h"
#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"

namespace py = pybind11;

namespace k2 {

namespace {

using comm::NcclApi;

constexpr const char* kNoCuda =
    "this build of k2 has no CUDA kernels, which the NCCL path needs (rebuild with nvcc available and K2_CUDA=ON)";

// The loaded NCCL, or UnsupportedError naming `op` and why it is missing.
const NcclApi& require_nccl(const char* op) {
    if (!kHasCuda) throw UnsupportedError(detail::concat("k2.ops.", op, ": ", kNoCuda));
    std::string reason;
    const NcclApi* api = comm::load_nccl({}, reason);
    if (api == nullptr) throw UnsupportedError(detail::concat("k2.ops.", op, ": NCCL is not available: ", reason));
    return *api;
}

// Runs fn with CUDA device `device` current (a CPU build has no device to select; require_nccl stopped it).
void on_device(int device, const std::function<void()>& fn) {
#ifdef K2_WITH_CUDA
    comm::with_device(device, fn);
#else
    (void)device;
    fn();
#endif
}

py::tuple availability(const NcclApi* api, const std::string& reason) {
    if (api == nullptr) return py::make_tuple(false, reason);
    return py::make_tuple(true, "NCCL " + comm::nccl_version_string(api->version) + " from " + api->path);
}

py::tuple nccl_load(const std::vector<std::string>& paths) {
    if (!kHasCuda) return py::make_tuple(false, std::string(kNoCuda));
    std::string reason;
    const NcclApi* api = comm::load_nccl(paths, reason);
    return availability(api, reason);
}

py::bytes nccl_unique_id() {
    const NcclApi& api = require_nccl("nccl_unique_id");
    comm::ncclUniqueId id;
    comm::check_nccl(api, api.get_unique_id(&id), "ncclGetUniqueId");
    return py::bytes(id.internal, sizeof(id.internal));
}

int64_t nccl_comm_init(const py::bytes& unique_id, int world_size, int rank, int device) {
    const char* op = "nccl_comm_init";
    const NcclApi& api = require_nccl(op);
    const std::string raw = unique_id;
    K2_CHECK_ARG(raw.size() == comm::kNcclUniqueIdBytes, op, "unique_id", "expected ", comm::kNcclUniqueIdBytes,
                 " bytes (from k2._C.nccl_unique_id), got ", raw.size());
    comm::ncclUniqueId id;
    std::memcpy(id.internal, raw.data(), raw.size());
    int64_t handle = 0;
    py::gil_scoped_release release;  // blocks until every rank has joined
    on_device(device, [&] { handle = comm::create_communicator(api, id, world_size, rank, device); });
    return handle;
}

bool nccl_comm_destroy(int64_t handle, bool abort) {
    const NcclApi* api = comm::loaded_nccl();
    if (api == nullptr) return false;  // no NCCL, so no communicator either
    const comm::Communicator c = [&] {
        try {
            return comm::find_communicator(handle, "nccl_comm_destroy");
        } catch (const ArgumentError&) {
            return comm::Communicator{};
        }
    }();
    if (c.comm == nullptr) return false;
    py::gil_scoped_release release;
    bool destroyed = false;
    on_device(c.device, [&] { destroyed = comm::destroy_communicator(*api, handle, abort); });
    return destroyed;
}

int nccl_comm_destroy_all(bool abort) {
    const NcclApi* api = comm::loaded_nccl();
    if (api == nullptr) return 0;
    py::gil_scoped_release release;
    return comm::destroy_all_communicators(*api, abort);
}

py::dict nccl_comm_info(int64_t handle) {
    const comm::Communicator c = comm::find_communicator(handle, "nccl_comm_info");
    py::dict info;
    info["rank"] = c.rank;
    info["world_size"] = c.world_size;
    info["device"] = c.device;
    return info;
}

// ---- dispatch / combine -----------------------------------------------------------------------------------

// Bytes of one row (dims 1..) of a contiguous view.
std::size_t row_bytes(const TensorView& t) {
    std::size_t n = dtype_size(t.dtype);
    for (int64_t d = 1; d < t.ndim(); ++d) n *= std::size_t(t.size(d));
    return n;
}

// Every view contiguous, on CUDA, on the communicator's device.
void expect_on_comm_device(const comm::Communicator& c, const char* op,
                           std::initializer_list<std::pair<const PyTensor*, const char*>> args) {
    for (const auto& [t, name] : args) {
        if (t == nullptr) continue;
        expect_contiguous(t->view, op, name);
        K2_CHECK_ARG(t->view.device == DeviceType::CUDA && t->view.device_index == c.device, op, name,
                     "expected a CUDA tensor on the communicator's device cuda:", c.device, ", got ",
                     t->view.describe());
    }
}

// Same trailing dims and dtype as `like`, and `rows` rows.
void expect_rows_like(const TensorView& t, const TensorView& like, int64_t rows, const char* op, const char* arg) {
    std::vector<int64_t> shape = like.shape;
    K2_CHECK_ARG(!shape.empty(), op, arg, "expected at least one dimension");
    shape[0] = rows;
    expect_shape(t, op, arg, shape);
    expect_dtype(t, op, arg, {like.dtype});
}

void expect_index(const TensorView& t, int64_t rows, const char* op, const char* arg) {
    expect_shape(t, op, arg, {rows});
    expect_dtype(t, op, arg, {DType::Int32});
}

void nccl_dispatch(int64_t handle, const py::handle& x_obj, const py::handle& send_copy_obj, int64_t top_k,
                   const py::handle& send_buf_obj, const py::handle& recv_buf_obj, const py::handle& recv_index_obj,
                   const py::handle& recv_x_obj, const std::vector<int64_t>& send_counts,
                   const std::vector<int64_t>& recv_counts, const py::list& extra_send, const py::list& extra_recv,
                   uintptr_t stream) {
    const char* op = "nccl_dispatch";
    const NcclApi& api = require_nccl(op);
    const comm::Communicator c = comm::find_communicator(handle, op);
    PyTensor x = to_view(x_obj, op, "x", stream), send_copy = to_view(send_copy_obj, op, "send_copy", stream);
    PyTensor send_buf = to_view(send_buf_obj, op, "send_buf", stream),
             recv_buf = to_view(recv_buf_obj, op, "recv_buf", stream);
    const bool unpack = !recv_index_obj.is_none();
    K2_CHECK_ARG(unpack == !recv_x_obj.is_none(), op, "recv_x", "pass recv_index and recv_x together, or neither");
    PyTensor recv_index, recv_x;
    if (unpack) {
        recv_index = to_view(recv_index_obj, op, "recv_index", stream);
        recv_x = to_view(recv_x_obj, op, "recv_x", stream);
    }
    expect_ndim(x.view, op, "x", 2);
    K2_CHECK_ARG(top_k >= 1, op, "top_k", "expected >= 1, got ", top_k);
    const int64_t T = x.view.size(0), S = send_buf.view.size(0), R = recv_buf.view.size(0);
    K2_CHECK_ARG(T * top_k < (int64_t(1) << 31), op, "x", "T*top_k must fit int32, got ", T * top_k);
    expect_index(send_copy.view, S, op, "send_copy");
    expect_rows_like(send_buf.view, x.view, S, op, "send_buf");
    expect_rows_like(recv_buf.view, x.view, R, op, "recv_buf");
    if (unpack) {
        expect_index(recv_index.view, R, op, "recv_index");
        expect_rows_like(recv_x.view, x.view, R, op, "recv_x");
    }
    comm::check_counts(send_counts, c.world_size, S, op, "send_counts");
    comm::check_counts(recv_counts, c.world_size, R, op, "recv_counts");
    expect_on_comm_device(c, op,
                          {{&x, "x"},
                           {&send_copy, "send_copy"},
                           {&send_buf, "send_buf"},
                           {&recv_buf, "recv_buf"},
                           {unpack ? &recv_index : nullptr, "recv_index"},
                           {unpack ? &recv_x : nullptr, "recv_x"}});

    comm::ExchangePlan plan{send_counts, recv_counts, {{send_buf.view.data, recv_buf.view.data, row_bytes(x.view)}}};
    K2_CHECK_ARG(extra_send.size() == extra_recv.size(), op, "extra_recv", "expected one receive buffer per lane (",
                 extra_send.size(), "), got ", extra_recv.size());
    std::vector<PyTensor> extras;  // keeps the lanes' views (and any DLPack owner) alive through the exchange
    for (std::size_t i = 0; i < extra_send.size(); ++i) {
        extras.push_back(to_view(extra_send[i], op, "extra_send", stream));
        extras.push_back(to_view(extra_recv[i], op, "extra_recv", stream));
        const PyTensor &s = extras[extras.size() - 2], &r = extras.back();
        K2_CHECK_ARG(s.view.ndim() >= 1 && s.view.size(0) == S, op, "extra_send", "expected ", S,
                     " rows (one per sent row), got ", s.view.describe());
        expect_rows_like(r.view, s.view, R, op, "extra_recv");
        expect_on_comm_device(c, op, {{&s, "extra_send"}, {&r, "extra_recv"}});
        plan.lanes.push_back({s.view.data, r.view.data, row_bytes(s.view)});
    }

    const comm::MoveRowsParams pack{x.view.data,
                                    static_cast<const int32_t*>(send_copy.view.data),
                                    top_k,
                                    send_buf.view.data,
                                    nullptr,
                                    S,
                                    int64_t(row_bytes(x.view))};
    const comm::MoveRowsParams unpack_rows{recv_buf.view.data,
                                           unpack ? static_cast<const int32_t*>(recv_index.view.data) : nullptr,
                                           1,
                                           unpack ? recv_x.view.data : nullptr,
                                           nullptr,
                                           R,
                                           int64_t(row_bytes(x.view))};
    auto s = reinterpret_cast<comm::cudaStream_t>(stream);
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    // Pack, exchange, unpack: all on the caller's stream, no host sync.
    comm::move_rows_cuda(pack, s);
    comm::exchange(api, c.comm, plan, s);
    if (unpack) comm::move_rows_cuda(unpack_rows, s);
#else
    (void)api, (void)s;
    throw UnsupportedError(kNoCuda);
#endif
}

void nccl_combine(int64_t handle, const py::handle& y_obj, const py::handle& recv_index_obj,
                  const py::handle& send_buf_obj, const py::handle& recv_buf_obj, const py::handle& send_copy_obj,
                  int64_t top_k, const py::handle& weights_obj, const py::handle& out_obj,
                  const std::vector<int64_t>& dispatch_send_counts, const std::vector<int64_t>& dispatch_recv_counts,
                  const py::handle& workspace_obj, uintptr_t stream) {
    const char* op = "nccl_combine";
    const NcclApi& api = require_nccl(op);
    const comm::Communicator c = comm::find_communicator(handle, op);
    PyTensor y = to_view(y_obj, op, "y", stream), recv_buf = to_view(recv_buf_obj, op, "recv_buf", stream);
    PyTensor send_copy = to_view(send_copy_obj, op, "send_copy", stream), out = to_view(out_obj, op, "out", stream);
    const bool repack = !recv_index_obj.is_none();
    K2_CHECK_ARG(repack == !send_buf_obj.is_none(), op, "send_buf",
                 "pass recv_index and send_buf together, or neither");
    PyTensor recv_index, send_buf, weights;
    if (repack) {
        recv_index = to_view(recv_index_obj, op, "recv_index", stream);
        send_buf = to_view(send_buf_obj, op, "send_buf", stream);
    }
    const bool weighted = !weights_obj.is_none();
    if (weighted) weights = to_view(weights_obj, op, "topk_weights", stream);

    expect_ndim(y.view, op, "y", 2);
    expect_dtype(y.view, op, "y", {DType::Float32, DType::BFloat16, DType::Float16});
    expect_ndim(out.view, op, "out", 2);
    const int64_t R = y.view.size(0), D = y.view.size(1), S = recv_buf.view.size(0), T = out.view.size(0);
    K2_CHECK_ARG(top_k >= 1, op, "top_k", "expected >= 1, got ", top_k);
    K2_CHECK_ARG(T * top_k < (int64_t(1) << 31), op, "out", "T*top_k must fit int32, got ", T * top_k);
    K2_CHECK_ARG(out.view.size(1) == D, op, "out", "expected ", D, " columns (y's), got ", out.view.describe());
    expect_dtype(out.view, op, "out", {y.view.dtype});
    expect_rows_like(recv_buf.view, y.view, S, op, "recv_buf");
    expect_index(send_copy.view, S, op, "send_copy");
    if (repack) {
        expect_index(recv_index.view, R, op, "recv_index");
        expect_rows_like(send_buf.view, y.view, R, op, "send_buf");
    }
    if (weighted) {
        expect_shape(weights.view, op, "topk_weights", {T, top_k});
        expect_dtype(weights.view, op, "topk_weights", {DType::Float32, DType::BFloat16, DType::Float16});
    }
    // The combine sends back what the dispatch received, and receives what it sent.
    comm::check_counts(dispatch_recv_counts, c.world_size, R, op, "dispatch_recv_counts");
    comm::check_counts(dispatch_send_counts, c.world_size, S, op, "dispatch_send_counts");
    expect_on_comm_device(c, op,
                          {{&y, "y"},
                           {&recv_buf, "recv_buf"},
                           {&send_copy, "send_copy"},
                           {&out, "out"},
                           {repack ? &recv_index : nullptr, "recv_index"},
                           {repack ? &send_buf : nullptr, "send_buf"},
                           {weighted ? &weights : nullptr, "topk_weights"}});
    PyTensor workspace = to_workspace(workspace_obj, out.view, op, stream);

    const std::size_t bytes = row_bytes(y.view);
    const comm::MoveRowsParams pack{y.view.data,
                                    nullptr,
                                    1,
                                    repack ? send_buf.view.data : nullptr,
                                    repack ? static_cast<const int32_t*>(recv_index.view.data) : nullptr,
                                    R,
                                    int64_t(bytes)};
    comm::ExchangePlan plan{dispatch_recv_counts,
                            dispatch_send_counts,
                            {{repack ? send_buf.view.data : y.view.data, recv_buf.view.data, bytes}}};
    const comm::CombineParams combine{recv_buf.view.data,
                                      static_cast<const int32_t*>(send_copy.view.data),
                                      weighted ? weights.view.data : nullptr,
                                      out.view.data,
                                      S,
                                      T,
                                      top_k,
                                      D,
                                      y.view.dtype,
                                      weighted ? weights.view.dtype : DType::Float32,
                                      as_workspace(workspace)};
    auto s = reinterpret_cast<comm::cudaStream_t>(stream);
    py::gil_scoped_release release;
#ifdef K2_WITH_CUDA
    // Pack, exchange, weighted sum: all on the caller's stream, no host sync.
    if (repack) comm::move_rows_cuda(pack, s);
    comm::exchange(api, c.comm, plan, s);
    comm::combine_cuda(combine, s);
#else
    (void)api, (void)s, (void)pack, (void)combine;
    throw UnsupportedError(kNoCuda);
#endif
}

std::size_t nccl_combine_workspace_size(int64_t num_tokens, int64_t top_k, const std::string& device_type, int device) {
    const char* op = "nccl_combine_workspace_size";
    K2_CHECK_ARG(num_tokens >= 0 && top_k >= 0, op, "num_tokens", "expected sizes >= 0");
    K2_CHECK_ARG(device_type == "cuda", op, "device_type", "the NCCL path runs on CUDA only, got '", device_type, "'");
    (void)device;
    return comm::combine_workspace_size(num_tokens, top_k);
}

}  // namespace

void register_comm(py::module_& m) {
    if (kHasCuda) add_kernel_family("comm", "cuda");  // no CPU kernels: the CPU path is torch.distributed (gloo)
    m.def("nccl_load", &nccl_load, py::arg("paths"),
          "Loads NCCL once per process: tries each path, then the loader's 'libnccl.so.2'. Returns (ok, reason); "
          "the reason names the library and NCCL version, or why every candidate failed.");
    m.def(
        "nccl_available", [] { return nccl_load({}); },
        "(ok, reason): whether the NCCL path can load NCCL (the default loader search, or an earlier nccl_load).");
    m.def("nccl_unique_id", &nccl_unique_id, "ncclGetUniqueId: 128 bytes for rank 0 to broadcast to the group.");
    m.def("nccl_comm_init", &nccl_comm_init, py::arg("unique_id"), py::arg("world_size"), py::arg("rank"),
          py::arg("device"),
          "ncclCommInitRank on CUDA device `device` (blocks until every rank joins); returns an integer handle.");
    m.def("nccl_comm_destroy", &nccl_comm_destroy, py::arg("comm"), py::arg("abort") = false,
          "ncclCommDestroy (or ncclCommAbort) of a handle; False when it was already destroyed.");
    m.def("nccl_comm_destroy_all", &nccl_comm_destroy_all, py::arg("abort") = false,
          "Destroys every live communicator (at exit); returns how many there were.");
    m.def("nccl_comm_info", &nccl_comm_info, py::arg("comm"), "{'rank', 'world_size', 'device'} of a handle.");
    m.def("nccl_live_communicators", [] { return comm::live_communicators(); }, "Handles of the live communicators.");
    m.def("nccl_dispatch", &nccl_dispatch, py::arg("comm"), py::arg("x"), py::arg("send_copy"), py::arg("top_k"),
          py::arg("send_buf"), py::arg("recv_buf"), py::arg("recv_index"), py::arg("recv_x"), py::arg("send_counts"),
          py::arg("recv_counts"), py::arg("extra_send"), py::arg("extra_recv"), py::arg("stream"),
          "send_buf[i] = x[send_copy[i] // top_k]; all-to-all send_buf -> recv_buf (and each extra lane) with "
          "per-peer row counts; recv_x[j] = recv_buf[recv_index[j]] when recv_index is given.");
    m.def("nccl_combine", &nccl_combine, py::arg("comm"), py::arg("y"), py::arg("recv_index"), py::arg("send_buf"),
          py::arg("recv_buf"), py::arg("send_copy"), py::arg("top_k"), py::arg("topk_weights"), py::arg("out"),
          py::arg("dispatch_send_counts"), py::arg("dispatch_recv_counts"), py::arg("workspace"), py::arg("stream"),
          "send_buf[recv_index[j]] = y[j]; all-to-all back (the dispatch's counts swapped) into recv_buf; "
          "out[t] = sum_k w[t, k] * recv_buf[pos(t*K + k)] in fp32, pos the inverse of send_copy.");
    m.def("nccl_combine_workspace_size", &nccl_combine_workspace_size, py::arg("num_tokens"), py::arg("top_k"),
          py::arg("device_type"), py::arg("device"),
          "Workspace bytes nccl_combine needs: the int32 inverse of send_copy, [T*K].");
}

}  // namespace k2
