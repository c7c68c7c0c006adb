// The slice of NCCL's C API that k2 uses, declared here so that no NCCL header is needed at build time, and a
// loader that finds libnccl.so.2 at run time with dlopen (architecture §3: the extension links only the CUDA
// runtime; NCCL comes from the nvidia-nccl-cu* package a CUDA build of torch installs).
//
// The declarations follow the NCCL API documentation (types and values are part of NCCL's stable C ABI):
//   types:        https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/api/types.html
//                 (ncclComm_t, ncclResult_t, ncclDataType_t; ncclUint8 = 1)
//   communicator: https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/api/comms.html
//                 (ncclGetUniqueId, ncclCommInitRank — the unique id is passed by value —, ncclCommDestroy,
//                 ncclCommAbort, ncclGetErrorString, ncclGetVersion)
//   group calls:  https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/api/group.html
//   p2p:          https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/api/p2p.html (ncclSend, ncclRecv)
//   unique id:    NCCL_UNIQUE_ID_BYTES = 128 (nccl.h).
// cudaStream_t is `struct CUstream_st*` in the CUDA runtime; it is declared the same way here, so this header
// needs no CUDA header either and the host code that drives NCCL compiles (and is tested) in a CPU build.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

struct CUstream_st;  // the CUDA runtime's stream type (declared at global scope, as cuda_runtime.h does)

namespace k2::comm {

// ---- NCCL's C types ---------------------------------------------------------------------------------------
struct NcclCommOpaque;  // NCCL's `struct ncclComm`, never dereferenced
using ncclComm_t = NcclCommOpaque*;
using cudaStream_t = ::CUstream_st*;

enum ncclResult_t : int {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};

enum ncclDataType_t : int { ncclInt8 = 0, ncclUint8 = 1 };  // only bytes cross: every row is a byte string

constexpr std::size_t kNcclUniqueIdBytes = 128;
struct ncclUniqueId {
    char internal[kNcclUniqueIdBytes];
};

// ---- The function table ------------------------------------------------------------------------------------
struct NcclApi {
    ncclResult_t (*get_unique_id)(ncclUniqueId* id) = nullptr;
    ncclResult_t (*comm_init_rank)(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) = nullptr;
    ncclResult_t (*comm_destroy)(ncclComm_t comm) = nullptr;
    ncclResult_t (*comm_abort)(ncclComm_t comm) = nullptr;
    const char* (*get_error_string)(ncclResult_t result) = nullptr;
    ncclResult_t (*send)(const void* buf, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                         cudaStream_t stream) = nullptr;
    ncclResult_t (*recv)(void* buf, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                         cudaStream_t stream) = nullptr;
    ncclResult_t (*group_start)() = nullptr;
    ncclResult_t (*group_end)() = nullptr;
    ncclResult_t (*get_version)(int* version) = nullptr;  // optional: only for the "NCCL 2.x.y" in messages

    std::string path;  // the file (or soname) dlopen opened
    int version = 0;   // NCCL_VERSION_CODE, e.g. 22703 for 2.27.3; 0 when unknown
};

// "2.27.3" from NCCL's version code (major*10000 + minor*100 + patch since 2.9), or "unknown".
std::string nccl_version_string(int code);

// Opens the first candidate (a path, or a bare soname for the default loader search) that dlopen can load and
// that exports every required symbol. On failure returns null and sets `reason` to one line per candidate
// ("<candidate>: <dlerror or the missing symbol>"). Each call opens anew (nothing is cached); the handle is
// never closed (NCCL keeps threads and CUDA state alive for the process).
std::unique_ptr<NcclApi> open_nccl(const std::vector<std::string>& candidates, std::string& reason);

// The process-wide NCCL, loaded once: the first successful load_nccl wins and later calls return it. `candidates`
// are tried first, then the default loader's "libnccl.so.2". Returns null (and the reason) while none loads.
const NcclApi* load_nccl(const std::vector<std::string>& candidates, std::string& reason);
// The loaded NCCL, or null.
const NcclApi* loaded_nccl();

// Throws std::runtime_error("k2 comm: WHAT: NCCL error <code> (<NCCL's string>)") unless result is ncclSuccess.
void check_nccl(const NcclApi& api, ncclResult_t result, const char* what);

}  // namespace k2::comm
