// Host side of the comm family: NCCL's run-time loader (dlopen), the exchange schedule of ncclSend/ncclRecv
// calls, and the table of live communicators. No CUDA here: NCCL is reached through the function table of
// nccl_api.h, so all of it is built (and tested, with a fake table) in CPU builds too.
#include <dlfcn.h>

#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "comm/comm.h"
#include "common/check.h"

namespace k2::comm {

// ---- Loader ------------------------------------------------------------------------------------------------

std::string nccl_version_string(int code) {
    if (code <= 0) return "unknown";
    // NCCL_VERSION(X, Y, Z): X*10000 + Y*100 + Z since 2.9, X*1000 + Y*100 + Z before.
    const int major = code >= 10000 ? code / 10000 : code / 1000;
    const int minor = code >= 10000 ? (code % 10000) / 100 : (code % 1000) / 100;
    return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(code % 100);
}

namespace {

template <typename Fn>
bool resolve(void* lib, const char* name, Fn& fn, std::string& missing) {
    fn = reinterpret_cast<Fn>(dlsym(lib, name));
    if (fn == nullptr && missing.empty()) missing = name;
    return fn != nullptr;
}

}  // namespace

std::unique_ptr<NcclApi> open_nccl(const std::vector<std::string>& candidates, std::string& reason) {
    std::ostringstream why;
    for (const std::string& candidate : candidates) {
        if (candidate.empty()) continue;
        void* lib = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr) {
            // dlerror's text usually starts with the file name already ("libnccl.so.2: cannot open ...").
            const char* text = dlerror();  // read once: dlerror clears the error
            const std::string err = text ? text : "";
            why << (why.tellp() > 0 ? "; " : "");
            if (err.rfind(candidate + ":", 0) != 0) why << candidate << ": ";
            why << (err.empty() ? "dlopen failed" : err);
            continue;
        }
        auto api = std::make_unique<NcclApi>();
        std::string missing;
        resolve(lib, "ncclGetUniqueId", api->get_unique_id, missing);
        resolve(lib, "ncclCommInitRank", api->comm_init_rank, missing);
        resolve(lib, "ncclCommDestroy", api->comm_destroy, missing);
        resolve(lib, "ncclCommAbort", api->comm_abort, missing);
        resolve(lib, "ncclGetErrorString", api->get_error_string, missing);
        resolve(lib, "ncclSend", api->send, missing);
        resolve(lib, "ncclRecv", api->recv, missing);
        resolve(lib, "ncclGroupStart", api->group_start, missing);
        resolve(lib, "ncclGroupEnd", api->group_end, missing);
        if (!missing.empty()) {
            // NOTE: not dlclose'd: it may be the copy torch already loaded (dlopen returns the same handle).
            why << (why.tellp() > 0 ? "; " : "") << candidate << ": has no symbol " << missing
                << " (not NCCL, or an NCCL older than 2.7)";
            continue;
        }
        std::string unused;
        if (resolve(lib, "ncclGetVersion", api->get_version, unused) && api->get_version(&api->version) != ncclSuccess)
            api->version = 0;
        api->path = candidate;
        reason.clear();
        return api;
    }
    reason = why.tellp() > 0 ? why.str() : "no candidate library to load";
    return nullptr;
}

namespace {

std::mutex& loader_mutex() {
    static std::mutex m;
    return m;
}
std::unique_ptr<NcclApi>& loaded() {
    static std::unique_ptr<NcclApi> api;
    return api;
}

}  // namespace

const NcclApi* load_nccl(const std::vector<std::string>& candidates, std::string& reason) {
    std::lock_guard<std::mutex> lock(loader_mutex());
    if (!loaded()) {
        std::vector<std::string> all = candidates;
        all.push_back("libnccl.so.2");  // the default loader search: LD_LIBRARY_PATH, rpath, ldconfig, loaded libs
        loaded() = open_nccl(all, reason);
    }
    if (loaded()) reason.clear();
    return loaded().get();
}

const NcclApi* loaded_nccl() {
    std::lock_guard<std::mutex> lock(loader_mutex());
    return loaded().get();
}

void check_nccl(const NcclApi& api, ncclResult_t result, const char* what) {
    if (result == ncclSuccess) return;
    const char* text = api.get_error_string ? api.get_error_string(result) : nullptr;
    throw std::runtime_error(detail::concat("k2 comm: ", what, ": NCCL error ", int(result), " (",
                                            text ? text : "no description",
                                            "); set NCCL_DEBUG=WARN for NCCL's own account"));
}

// ---- Exchange plan -----------------------------------------------------------------------------------------

std::vector<int64_t> displacements(const std::vector<int64_t>& counts) {
    std::vector<int64_t> displ(counts.size() + 1, 0);
    for (std::size_t p = 0; p < counts.size(); ++p) displ[p + 1] = displ[p] + counts[p];
    return displ;
}

void check_counts(const std::vector<int64_t>& counts, int world_size, int64_t rows, const char* op, const char* arg) {
    K2_CHECK_ARG(int64_t(counts.size()) == world_size, op, arg, "expected one row count per rank (", world_size,
                 "), got ", counts.size());
    int64_t total = 0;
    for (std::size_t p = 0; p < counts.size(); ++p) {
        K2_CHECK_ARG(counts[p] >= 0, op, arg, "expected counts >= 0, got ", counts[p], " for rank ", p);
        total += counts[p];
    }
    K2_CHECK_ARG(total == rows, op, arg, "the counts sum to ", total, " rows but the buffer has ", rows);
}

void exchange(const NcclApi& api, ncclComm_t comm, const ExchangePlan& plan, cudaStream_t stream) {
    const std::vector<int64_t> send_displ = displacements(plan.send_counts),
                               recv_displ = displacements(plan.recv_counts);
    const int world = int(plan.send_counts.size());
    check_nccl(api, api.group_start(), "ncclGroupStart");
    ncclResult_t first_error = ncclSuccess;
    const char* failed = nullptr;
    for (const Lane& lane : plan.lanes) {
        if (lane.row_bytes == 0) continue;
        for (int peer = 0; peer < world && first_error == ncclSuccess; ++peer) {
            const std::size_t send_rows = std::size_t(plan.send_counts[peer]),
                              recv_rows = std::size_t(plan.recv_counts[peer]);
            if (send_rows > 0) {
                const char* src = static_cast<const char*>(lane.send) + send_displ[peer] * lane.row_bytes;
                first_error = api.send(src, send_rows * lane.row_bytes, ncclUint8, peer, comm, stream);
                failed = "ncclSend";
            }
            if (recv_rows > 0 && first_error == ncclSuccess) {
                char* dst = static_cast<char*>(lane.recv) + recv_displ[peer] * lane.row_bytes;
                first_error = api.recv(dst, recv_rows * lane.row_bytes, ncclUint8, peer, comm, stream);
                failed = "ncclRecv";
            }
        }
    }
    // NOTE: the group is always closed, so a failed call inside it leaves no group open in this thread.
    const ncclResult_t end = api.group_end();
    check_nccl(api, first_error, failed ? failed : "ncclSend/ncclRecv");
    check_nccl(api, end, "ncclGroupEnd");
}

// ---- Communicators -----------------------------------------------------------------------------------------

namespace {

struct CommunicatorTable {
    std::mutex mutex;
    std::map<int64_t, Communicator> live;
    int64_t next = 1;
};

CommunicatorTable& table() {
    static CommunicatorTable t;
    return t;
}

}  // namespace

int64_t create_communicator(const NcclApi& api, const ncclUniqueId& id, int world_size, int rank, int device) {
    const char* op = "nccl_comm_init";
    K2_CHECK_ARG(world_size >= 1, op, "world_size", "expected >= 1, got ", world_size);
    K2_CHECK_ARG(rank >= 0 && rank < world_size, op, "rank", "expected a rank in [0, ", world_size, "), got ", rank);
    K2_CHECK_ARG(device >= 0, op, "device", "expected a CUDA device index >= 0, got ", device);
    Communicator c{nullptr, rank, world_size, device};
    // Blocks until all world_size ranks have called it with the same id.
    check_nccl(api, api.comm_init_rank(&c.comm, world_size, id, rank), "ncclCommInitRank");
    CommunicatorTable& t = table();
    std::lock_guard<std::mutex> lock(t.mutex);
    const int64_t handle = t.next++;
    t.live[handle] = c;
    return handle;
}

Communicator find_communicator(int64_t handle, const char* op) {
    CommunicatorTable& t = table();
    std::lock_guard<std::mutex> lock(t.mutex);
    auto it = t.live.find(handle);
    K2_CHECK_ARG(it != t.live.end(), op, "comm", "no live NCCL communicator has handle ", handle,
                 " (destroyed, or not made by k2.ops._nccl.create_communicator)");
    return it->second;
}

bool destroy_communicator(const NcclApi& api, int64_t handle, bool abort) {
    Communicator c;
    {
        CommunicatorTable& t = table();
        std::lock_guard<std::mutex> lock(t.mutex);
        auto it = t.live.find(handle);
        if (it == t.live.end()) return false;
        c = it->second;
        t.live.erase(it);
    }
    check_nccl(api, abort ? api.comm_abort(c.comm) : api.comm_destroy(c.comm),
               abort ? "ncclCommAbort" : "ncclCommDestroy");
    return true;
}

int destroy_all_communicators(const NcclApi& api, bool abort) {
    int n = 0;
    for (int64_t handle : live_communicators()) {
        try {
            n += destroy_communicator(api, handle, abort) ? 1 : 0;
        } catch (const std::exception&) {
            ++n;  // at exit, a failing destroy must not stop the others
        }
    }
    return n;
}

std::vector<int64_t> live_communicators() {
    CommunicatorTable& t = table();
    std::lock_guard<std::mutex> lock(t.mutex);
    std::vector<int64_t> handles;
    for (const auto& entry : t.live) handles.push_back(entry.first);
    return handles;
}

}  // namespace k2::comm
