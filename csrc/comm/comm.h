// Expert-parallel token exchange over NCCL: params structs and host API of the comm family.
//
// Dimensions: T local tokens, K experts per token (top-k), D hidden size, W ranks in the EP group,
// S rows this rank sends in the dispatch (the token copies routed to some rank, itself included),
// R rows it receives. Per-peer row counts are known on the host before any of this runs (the caller exchanges
// them first, e.g. with torch.distributed.all_to_all_single); nothing here synchronises with the device.
//
//   dispatch:  send_buf[i] = x[send_copy[i] / K]            (pack: send_copy [S] int32 = flat copy index t*K + k,
//                                                            grouped by destination rank)
//              all-to-all of send_buf [S, D] -> recv_buf [R, D] (rows grouped by source rank, in the order sent)
//              recv_x[j] = recv_buf[recv_index[j]]           (unpack: recv_index [R] int32, a permutation that
//                                                            orders the rows by local expert)
//   combine:   send_buf[recv_index[j]] = y[j]                (pack: the expert outputs back in arrival order)
//              all-to-all back with the dispatch's counts swapped -> recv_buf [S, D] (recv_buf[i] answers
//              send_copy[i])
//              out[t] = sum_k w[t, k] * recv_buf[pos(t*K + k)]   (pos = inverse of send_copy; a copy that was
//                                                            not sent adds nothing; fp32 accumulation)
// Rows are moved as bytes (any dtype; the ops use bf16 and fp32); combine reads fp32, bf16 or fp16 rows and
// weights. Extra per-row lanes (expert ids, routing weights) travel in the same NCCL group as the rows.
// The CUDA kernels and the NCCL calls run on the caller's stream; buffers and workspaces come from the caller.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comm/nccl_api.h"
#include "common/dtype.h"
#include "common/workspace.h"

namespace k2::comm {

// ---- Host-side planning (comm/host.cpp) --------------------------------------------------------------------

// Exclusive prefix sums: displacements(c)[p] = c[0] + ... + c[p-1], with W + 1 entries (the last is the total).
std::vector<int64_t> displacements(const std::vector<int64_t>& counts);

// Checks a per-peer row count list: W entries, each >= 0, summing to `rows` (the rows of the buffer they
// describe). Throws k2::ArgumentError naming `op` and `arg`.
void check_counts(const std::vector<int64_t>& counts, int world_size, int64_t rows, const char* op, const char* arg);

// One byte stream of the exchange: rows of `row_bytes` bytes, sent from `send` (grouped by destination rank)
// into `recv` (grouped by source rank).
struct Lane {
    const void* send;
    void* recv;
    std::size_t row_bytes;
};

struct ExchangePlan {
    std::vector<int64_t> send_counts, recv_counts;  // rows per peer, W entries each
    std::vector<Lane> lanes;
};

// One ncclGroupStart/End holding, for every lane and every peer with rows to move, one ncclSend of
// send_counts[p] rows at send_displ[p] and one ncclRecv of recv_counts[p] rows at recv_displ[p] (bytes,
// ncclUint8; a rank's rows to itself go through NCCL too). Peers with no rows get no call, so a rank that sends
// or receives nothing still takes part. ncclGroupEnd is called even when a send or recv fails inside the group.
void exchange(const NcclApi& api, ncclComm_t comm, const ExchangePlan& plan, cudaStream_t stream);

// ---- Communicators (comm/host.cpp) -------------------------------------------------------------------------
// Python holds a communicator by an integer handle (> 0), never a pointer: an unknown or destroyed handle is an
// argument error, not a crash.

struct Communicator {
    ncclComm_t comm = nullptr;
    int rank = 0, world_size = 0, device = 0;
};

// ncclCommInitRank on the current CUDA device (the caller makes `device` current) and a new handle for it.
int64_t create_communicator(const NcclApi& api, const ncclUniqueId& id, int world_size, int rank, int device);
// The communicator of `handle`; throws k2::ArgumentError naming `op` when there is none.
Communicator find_communicator(int64_t handle, const char* op);
// ncclCommDestroy (or ncclCommAbort) and forget the handle. False when the handle is unknown (already destroyed).
bool destroy_communicator(const NcclApi& api, int64_t handle, bool abort);
// Destroys every live communicator (at interpreter exit); returns how many there were.
int destroy_all_communicators(const NcclApi& api, bool abort);
std::vector<int64_t> live_communicators();

// ---- CUDA kernels (comm/cuda.cu) ---------------------------------------------------------------------------

// dst[dst_row(i)] = src[src_row(i)] for i in [0, rows), rows of row_bytes bytes;
// src_row(i) = src_index ? src_index[i] / src_divisor : i, dst_row(i) = dst_index ? dst_index[i] : i.
// Pack of the dispatch: src_index = send_copy, src_divisor = K; unpack: src_index = recv_index; pack of the
// combine: dst_index = recv_index. Indices are not checked on the device (a host sync would be needed).
struct MoveRowsParams {
    const void* src;
    const int32_t* src_index;  // [rows] or null
    int64_t src_divisor;       // >= 1
    void* dst;
    const int32_t* dst_index;  // [rows] or null
    int64_t rows, row_bytes;
};

// out[t] = sum_k w[t, k] * rows[pos(t*K + k)] (w = 1 when weights is null), pos the inverse of send_copy built in
// the workspace (int32 [T*K], -1 for a copy that was not sent).
struct CombineParams {
    const void* rows;          // [S, D] dtype
    const int32_t* send_copy;  // [S]
    const void* weights;       // [T, K] weight_dtype, or null
    void* out;                 // [T, D] dtype
    int64_t num_sent, num_tokens, top_k, hidden;
    DType dtype, weight_dtype;
    Workspace workspace;  // combine_workspace_size(T, K) bytes
};

inline std::size_t combine_workspace_size(int64_t num_tokens, int64_t top_k) {
    return WorkspacePlan::round_up(std::size_t(num_tokens * top_k) * sizeof(int32_t));
}

void move_rows_cuda(const MoveRowsParams& p, cudaStream_t stream);
void combine_cuda(const CombineParams& p, cudaStream_t stream);
// Runs fn with CUDA device `device` current, then restores the previous one (ncclCommInitRank binds the
// communicator to the current device).
void with_device(int device, const std::function<void()>& fn);

}  // namespace k2::comm
