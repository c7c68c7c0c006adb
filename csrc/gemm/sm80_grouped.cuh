// The CUTLASS 2.x grouped GEMM for Ampere-class GPUs (bf16), included once per layout by sm80_bf16_*.cu:
// 128x128x32 threadblock tiles, 64x64 warp tiles, mma.sync 16x8x16, 4-stage cp.async pipeline, a persistent
// grid whose problem visitor computes each group's tile count on the device (GroupScheduleMode::kDeviceOnly),
// so the offsets never reach the host. build_sm80_arguments writes the per-group sizes, pointers and leading
// dimensions from the offsets, one thread per group, into the caller's workspace (Sm80Plan).
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#include "common/nvtx.h"
#include "gemm/kernels.h"

namespace k2::gemm {

template <class LayoutA, class LayoutB>
struct Sm80Bf16Config {
    using Element = cutlass::bfloat16_t;
    using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
        Element, LayoutA, cutlass::ComplexTransform::kNone, 8, Element, LayoutB, cutlass::ComplexTransform::kNone, 8,
        Element, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
        cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
        cutlass::gemm::GemmShape<16, 8, 16>, cutlass::epilogue::thread::LinearCombination<Element, 8, float, float>,
        cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
        cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
    using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

template <class Element>
__global__ void build_sm80_arguments(GroupedDesc desc, const Element* a, const Element* b, const Element* c, Element* d,
                                     cutlass::gemm::GemmCoord* shapes, Element** ptr_a, Element** ptr_b,
                                     Element** ptr_c, Element** ptr_d, int64_t* lds) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const int groups = desc.num_groups;
    if (e >= groups) return;
    int64_t begin = 0, end = 0;
    if (desc.mode != GroupedMode::kBatch) begin = e > 0 ? desc.offsets[e - 1] : 0, end = desc.offsets[e];
    const GroupProblem g = group_problem(desc, e, begin, end);
    shapes[e] = cutlass::gemm::GemmCoord(g.m, g.n, g.k);
    ptr_a[e] = const_cast<Element*>(a) + g.a_offset;
    ptr_b[e] = const_cast<Element*>(b) + g.b_offset;
    ptr_c[e] = const_cast<Element*>(c) + g.c_offset;
    ptr_d[e] = d + g.d_offset;
    lds[e] = g.lda, lds[groups + e] = g.ldb, lds[2 * groups + e] = g.ldc, lds[3 * groups + e] = g.ldd;
}

// The workspace: per-group sizes, pointers and leading dimensions, then CUTLASS's own workspace.
template <class Config>
struct Sm80Plan {
    using Gemm = typename Config::Gemm;
    using Element = typename Config::Element;
    WorkspacePlan arrays;
    int shapes, ptrs, lds, cutlass;
    int threadblocks;

    explicit Sm80Plan(const GroupedRun& r) {
        const std::size_t groups = std::size_t(r.desc.num_groups);
        shapes = arrays.add(groups * sizeof(cutlass::gemm::GemmCoord));
        ptrs = arrays.add(4 * groups * sizeof(void*));
        lds = arrays.add(4 * groups * sizeof(int64_t));
        // Persistent grid: as many threadblocks as fit on the GPU at once; the problem visitor hands out tiles.
        threadblocks = Gemm::maximum_active_blocks() * r.sm_count;
        if (threadblocks <= 0) fail_cutlass("maximum_active_blocks", "kernel does not fit on this GPU");
        Gemm gemm;
        cutlass = arrays.add(gemm.get_workspace_size(arguments(r, nullptr)));
    }

    typename Gemm::Arguments arguments(const GroupedRun& r, void* base) const {
        const int groups = r.desc.num_groups;
        auto* ptr = base ? arrays.at<Element*>(base, ptrs) : nullptr;
        auto* ld = base ? arrays.at<int64_t>(base, lds) : nullptr;
        auto* shape = base ? arrays.at<cutlass::gemm::GemmCoord>(base, shapes) : nullptr;
        typename Gemm::EpilogueOutputOp::Params epilogue(r.alpha, r.beta);
        return typename Gemm::Arguments(shape, groups, threadblocks, epilogue, ptr, ptr + groups, ptr + 2 * groups,
                                        ptr + 3 * groups, ld, ld + groups, ld + 2 * groups, ld + 3 * groups);
    }
};

template <class Config>
std::size_t sm80_workspace(const GroupedRun& r) {
    return r.desc.num_groups > 0 ? Sm80Plan<Config>(r).arrays.total : 0;
}

template <class Config>
void run_sm80_grouped(const GroupedRun& r, const char* name) {
    K2_NVTX_RANGE(name);
    using Element = typename Config::Element;
    const int groups = r.desc.num_groups;
    const Sm80Plan<Config> plan(r);
    expect_workspace(r.workspace, plan.arrays.total, "grouped_gemm");
    auto args = plan.arguments(r, r.workspace.data);
    build_sm80_arguments<Element><<<(groups + 127) / 128, 128, 0, r.stream>>>(
        r.desc, static_cast<const Element*>(r.a), static_cast<const Element*>(r.b),
        static_cast<const Element*>(r.c ? r.c : r.d), static_cast<Element*>(r.d), args.problem_sizes, args.ptr_A,
        args.ptr_B, args.ptr_C, args.ptr_D, args.lda);
    check_cuda(cudaGetLastError(), "build_sm80_arguments launch");

    typename Config::Gemm gemm;
    cutlass::Status status =
        gemm.initialize(args, plan.arrays.template at<char>(r.workspace.data, plan.cutlass), r.stream);
    if (status != cutlass::Status::kSuccess) fail_cutlass("initialize", cutlassGetStatusString(status));
    status = gemm.run(r.stream);
    if (status != cutlass::Status::kSuccess) fail_cutlass("run", cutlassGetStatusString(status));
}

}  // namespace k2::gemm
