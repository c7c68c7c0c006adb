// Shared by the CUTLASS 3.x Hopper grouped GEMM files (sm90_bf16_*.cu via sm90_bf16_grouped.inl, and
// sm90_fp8_blockwise.cu): CUTLASS headers and helpers to fill CUTLASS's per-group argument arrays on the device.
// NOTE: CUTLASS types are named at namespace scope in each .cu file, never through a template parameter of a
// __global__ function: nvcc's generated host stubs mis-parse such dependent CUTLASS types under gcc.
#pragma once

#include <cuda_runtime.h>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "common/nvtx.h"
#include "gemm/kernels.h"

namespace k2::gemm {

// A stride of CUTLASS type S (one dynamic leading dimension, unit stride, batch stride) with that leading
// dimension set to `ld`.
template <class S>
__device__ __forceinline__ S stride_with_ld(int64_t ld) {
    S s{};
    if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>>) {
        cute::get<1>(s) = ld;
    } else {
        cute::get<0>(s) = ld;
    }
    return s;
}

// How many clusters of Kernel can be resident at once on the current device, counting the dynamic shared memory
// it launches with (cudaOccupancyMaxActiveClusters). The persistent tile scheduler sizes its grid from this
// (KernelHardwareInfo::max_active_clusters) instead of assuming that sm_count / cluster_size clusters fit, which
// fails when GPCs hold SM counts that are no multiple of the cluster size or other work occupies SMs.
template <class Kernel>
int max_active_clusters() {
    const void* kernel = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
    constexpr int kSmem = Kernel::SharedStorageSize;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               "cudaFuncSetAttribute");
    using Cluster = typename Kernel::ClusterShape;
    const dim3 cluster(cute::size<0>(Cluster{}), cute::size<1>(Cluster{}), cute::size<2>(Cluster{}));
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster.x, attribute.val.clusterDim.y = cluster.y;
    attribute.val.clusterDim.z = cluster.z;
    cudaLaunchConfig_t config{};
    config.gridDim = cluster;  // one cluster: the grid must be a multiple of the cluster shape
    config.blockDim = dim3(Kernel::MaxThreadsPerBlock, 1, 1);
    config.dynamicSmemBytes = kSmem;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    check_cuda(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config), "cudaOccupancyMaxActiveClusters");
    if (clusters <= 0) fail_cutlass("cluster occupancy", "no cluster of this kernel fits on the device");
    return clusters;
}

// Throws unless a CUTLASS call succeeded.
inline void check_cutlass(cutlass::Status status, const char* what) {
    if (status != cutlass::Status::kSuccess) fail_cutlass(what, cutlassGetStatusString(status));
}

}  // namespace k2::gemm
