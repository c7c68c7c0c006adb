// Host side of the gemm family's CUDA path: picks the back end per call (grouped_problem.h: choose_backend) and
// the layout, zero-fills the weight gradient of empty groups, sizes the workspace, and launches. Nothing here
// reads the offsets. Empty problems (no rows, no groups, K = 0) are finished here, never launched as empty grids.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/cuda_elements.cuh"
#include "common/nvtx.h"
#include "gemm/gemm.h"
#include "gemm/kernels.h"

namespace k2::gemm {

void check_cuda(cudaError_t err, const char* what) {
    cu::check(err, "gemm", what);
}

void fail_cutlass(const char* what, const std::string& status) {
    throw std::runtime_error(std::string("k2 gemm: CUTLASS ") + what + " failed: " + status);
}

namespace {

#ifdef K2_GEMM_SM90
constexpr bool kHaveSm90 = true;
#else
constexpr bool kHaveSm90 = false;
#endif
#ifdef K2_GEMM_SM80
constexpr bool kHaveSm80 = true;
#else
constexpr bool kHaveSm80 = false;
#endif

struct DeviceInfo {
    int major = 0, minor = 0, sm_count = 0;
};

// Compute capability and SM count of `device`, queried once.
DeviceInfo device_info(int device) {
    static std::mutex mutex;
    static std::vector<DeviceInfo> cache;
    std::lock_guard<std::mutex> lock(mutex);
    if (device >= int(cache.size())) cache.resize(device + 1);
    DeviceInfo& info = cache[device];
    if (info.sm_count == 0) {
        check_cuda(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device), "device query");
        check_cuda(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device), "device query");
        check_cuda(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device), "device query");
    }
    return info;
}

int current_device() {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    return device;
}

ElementKind element_kind(DType dtype) {
    switch (dtype) {
        case DType::Float32:
            return ElementKind::kFloat32;
        case DType::BFloat16:
            return ElementKind::kBFloat16;
        case DType::Float16:
            return ElementKind::kFloat16;
        default:
            throw std::invalid_argument("k2 gemm: expected float32, bfloat16 or float16");
    }
}

// dW_e = 0 for every empty group e (its problem is empty, so no GEMM writes it).
template <typename Word>
__global__ void zero_empty_groups(const int32_t* offsets, int num_groups, Word* dw, int64_t words_per_group) {
    for (int e = blockIdx.y; e < num_groups; e += gridDim.y) {
        const int32_t begin = e > 0 ? offsets[e - 1] : 0;
        if (offsets[e] > begin) continue;
        Word* out = dw + e * words_per_group;
        for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words_per_group;
             i += int64_t(gridDim.x) * blockDim.x)
            out[i] = Word{};
    }
}

// The workspace of the back end workspace_backend picks for `layout` (before the operands' alignment is known).
std::size_t tensor_core_workspace(const GroupedRun& r, DType dtype, GemmLayout layout) {
    if (r.desc.num_groups <= 0) return 0;
    const DeviceInfo info = device_info(r.device);
    const Backend backend = workspace_backend(element_kind(dtype), info.major, info.minor, kHaveSm90, kHaveSm80);
#ifdef K2_GEMM_SM90
    if (backend == Backend::kSm90) {
        if (layout == GemmLayout::kRowCol) return workspace_sm90_bf16_row_col(r);
        if (layout == GemmLayout::kRowRow) return workspace_sm90_bf16_row_row(r);
        return workspace_sm90_bf16_col_row(r);
    }
#endif
#ifdef K2_GEMM_SM80
    if (backend == Backend::kSm80) {
        if (layout == GemmLayout::kRowCol) return workspace_sm80_bf16_row_col(r);
        if (layout == GemmLayout::kRowRow) return workspace_sm80_bf16_row_row(r);
        return workspace_sm80_bf16_col_row(r);
    }
#endif
    (void)layout, (void)backend;
    return 0;
}

void run(const GroupedRun& r, DType dtype, std::initializer_list<int64_t> leading_dims) {
    const DeviceInfo info = device_info(r.device);
    const bool aligned = tensor_core_aligned(leading_dims, {r.a, r.b, r.d, r.c ? r.c : r.d});
    const Backend backend = choose_backend(element_kind(dtype), info.major, info.minor, aligned, kHaveSm90, kHaveSm80);
    const GemmLayout layout = layout_of(r.desc);
#ifdef K2_GEMM_SM90
    if (backend == Backend::kSm90) {
        if (layout == GemmLayout::kRowCol) return run_sm90_bf16_row_col(r);
        if (layout == GemmLayout::kRowRow) return run_sm90_bf16_row_row(r);
        return run_sm90_bf16_col_row(r);
    }
#endif
#ifdef K2_GEMM_SM80
    if (backend == Backend::kSm80) {
        if (layout == GemmLayout::kRowCol) return run_sm80_bf16_row_col(r);
        if (layout == GemmLayout::kRowRow) return run_sm80_bf16_row_row(r);
        return run_sm80_bf16_col_row(r);
    }
#endif
    (void)layout;
    run_simt(r, dtype);
}

}  // namespace

std::size_t grouped_workspace_size(DType dtype, int64_t num_groups, int device) {
    if (num_groups <= 0 || dtype != DType::BFloat16) return 0;  // only the bf16 tensor-core paths need one
    cu::ScopedDevice scope(device);
    GroupedRun r{};
    r.desc.num_groups = int32_t(num_groups);
    r.device = device;
    r.sm_count = device_info(device).sm_count;
    std::size_t bytes = 0;
    for (GemmLayout layout : {GemmLayout::kRowCol, GemmLayout::kRowRow, GemmLayout::kColRow})
        bytes = std::max(bytes, tensor_core_workspace(r, dtype, layout));
    return bytes;
}

std::size_t grouped_gemm_fp8_workspace_size(int64_t num_groups, int device) {
    if (num_groups <= 0) return 0;
    cu::ScopedDevice scope(device);
    if (!fp8_supported(device)) return 0;
#ifdef K2_GEMM_SM90
    return workspace_sm90_fp8_blockwise(int(num_groups), device, device_info(device).sm_count);
#else
    return 0;
#endif
}

void grouped_gemm_cuda(const GroupedGemmParams& p, void* stream) {
    K2_NVTX_RANGE(p.desc.mode == GroupedMode::kWgrad ? "k2::grouped_gemm_wgrad" : "k2::grouped_gemm");
    const GroupedDesc& desc = p.desc;
    auto s = static_cast<cudaStream_t>(stream);
    const int64_t elem = p.dtype == DType::Float32 ? 4 : 2;
    if (desc.mode == GroupedMode::kRows) {
        if (p.total_rows == 0 || desc.n == 0) return;
        // No reduction (K = 0) or no group owning any row (E = 0): every product is empty, out is zero. Handled
        // here because a launch over zero groups is a zero-sized grid.
        if (desc.k == 0 || desc.num_groups == 0)
            return check_cuda(cudaMemsetAsync(p.d, 0, p.total_rows * desc.n * elem, s), "memset");
    }
    // kWgrad: dW [E, k, n] (or [E, n, k]).
    const int64_t group_elems = desc.k * desc.n;
    if (desc.mode == GroupedMode::kWgrad && (group_elems == 0 || desc.num_groups == 0)) return;
    const int device = current_device();
    const GroupedRun r{
        desc, p.a, p.b, nullptr, p.d, 1.0f, 0.0f, p.total_rows, device, device_info(device).sm_count, s, p.workspace};
    if (desc.mode == GroupedMode::kRows) return run(r, p.dtype, {desc.k, desc.n});
    const int64_t group_bytes = group_elems * elem;
    const dim3 grid(unsigned(std::min<int64_t>((group_bytes / 2 + 255) / 256, 1024)),
                    unsigned(std::min(desc.num_groups, 65535)));
    if (group_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.d) % 16 == 0) {
        zero_empty_groups<<<grid, 256, 0, s>>>(desc.offsets, desc.num_groups, static_cast<int4*>(p.d),
                                               group_bytes / 16);
    } else {
        zero_empty_groups<<<grid, 256, 0, s>>>(desc.offsets, desc.num_groups, static_cast<uint16_t*>(p.d),
                                               group_bytes / 2);
    }
    check_cuda(cudaGetLastError(), "zero_empty_groups launch");
    if (p.total_rows > 0) run(r, p.dtype, {desc.k, desc.n});
}

void batched_gemm_cuda(const BatchedGemmParams& p, void* stream) {
    const GroupedDesc& d = p.desc;
    if (d.num_groups == 0 || d.batch_m == 0 || d.batch_n == 0) return;
    const int device = current_device();
    const GroupedRun r{d,
                       p.a,
                       p.b,
                       p.c,
                       p.d,
                       p.alpha,
                       p.beta,
                       d.batch_m,
                       device,
                       device_info(device).sm_count,
                       static_cast<cudaStream_t>(stream),
                       p.workspace};
    run(r, p.dtype,
        {d.batch_lda, d.batch_ldb, d.batch_ldc, d.batch_ldd, d.stride_a, d.stride_b, d.stride_c, d.stride_d});
}

bool fp8_supported(int device) {
    if (!kHaveSm90) return false;
    const DeviceInfo info = device_info(device);
    return info.major == 9 && info.minor == 0;
}

void grouped_gemm_fp8_cuda(const GroupedGemmFp8Params& p, void* stream) {
    K2_NVTX_RANGE("k2::grouped_gemm_fp8");
    const int device = current_device();
    if (!fp8_supported(device))
        throw UnsupportedError("k2.ops.grouped_gemm_fp8: needs an sm_90 GPU and a build with sm_90a kernels");
    if (p.total_rows == 0 || p.n == 0) return;
    auto s = static_cast<cudaStream_t>(stream);
    // K = 0 or no groups (E = 0): out is zero, without a zero-sized launch.
    if (p.k == 0 || p.num_groups == 0)
        return check_cuda(cudaMemsetAsync(p.out, 0, p.total_rows * p.n * 2, s), "memset");
#ifdef K2_GEMM_SM90
    run_sm90_fp8_blockwise(p, device, device_info(device).sm_count, s);
#endif
}

}  // namespace k2::gemm
