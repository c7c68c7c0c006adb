// Workspaces: the device scratch memory a kernel needs besides its outputs (CUTLASS's per-group argument arrays,
// CUB's sort storage, Newton-Schulz's iterates). The caller allocates it and passes it in, like the outputs
// (k2.ops allocates it through torch's caching allocator, so it shares torch's memory pool and is freed even
// when a kernel throws); each op has a <op>_workspace_size query for the byte count. No kernel allocates.
//
// A workspace is carved into arrays by a WorkspacePlan: consecutive byte offsets, each aligned to kAlign (TMA
// descriptors and CUTLASS's own workspace want 128 bytes; 256 also covers CUB). The base must be kAlign-aligned,
// which every torch allocation is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "common/check.h"

namespace k2 {

struct Workspace {
    void* data = nullptr;
    std::size_t bytes = 0;
};

struct WorkspacePlan {
    static constexpr std::size_t kAlign = 256;
    static constexpr int kMaxArrays = 16;
    std::size_t offset[kMaxArrays] = {};
    int count = 0;
    std::size_t total = 0;

    static constexpr std::size_t round_up(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

    // Appends an array of `bytes` and returns its index.
    int add(std::size_t bytes) {
        if (count == kMaxArrays) throw std::length_error("k2: a WorkspacePlan holds at most 16 arrays");
        offset[count] = total;
        total += round_up(bytes);
        return count++;
    }

    // Array `index` inside the workspace at `base`.
    template <typename T>
    T* at(void* base, int index) const {
        return reinterpret_cast<T*>(static_cast<char*>(base) + offset[index]);
    }
};

// Throws k2::ArgumentError naming `op`'s 'workspace' argument unless `ws` holds `need` bytes at a
// kAlign-aligned address. Nothing is checked when nothing is needed (an empty workspace is then fine).
inline void expect_workspace(const Workspace& ws, std::size_t need, const char* op) {
    if (need == 0) return;
    K2_CHECK_ARG(ws.bytes >= need, op, "workspace", "expected at least ", need, " bytes (k2._C.", op,
                 "_workspace_size), got ", ws.bytes);
    K2_CHECK_ARG(reinterpret_cast<uintptr_t>(ws.data) % WorkspacePlan::kAlign == 0, op, "workspace", "expected a ",
                 WorkspacePlan::kAlign, "-byte aligned address");
}

}  // namespace k2
