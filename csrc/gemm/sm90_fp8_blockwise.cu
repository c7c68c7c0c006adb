// FP8 grouped GEMM with DeepSeek-V3 block scales on Hopper: out_e [M_e, N] (bf16) = sum over 128-wide K blocks
// of (x_e block . w_e block^T) * x_scale[row, kb] * w_scale[e, nb, kb], accumulated in fp32. CUTLASS 3.x
// ptr-array kernel with blockwise scaling (TMA + warp-specialised cooperative WGMMA, 128x128x128 tiles): the
// scales are applied to each K block's partial sums in registers, never by dequantising operands. Both scale
// tensors are K-major, exactly the layouts k2's quantize_1x128 / 128x128 produce: x_scale [T, ceil(K/128)] and
// w_scale [E, ceil(N/128), ceil(K/128)]. Compiled for sm_90a only.
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <mutex>
#include <vector>

#include "gemm/sm90_grouped.cuh"

namespace k2::gemm {

namespace {

using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
using ElementIn = cutlass::float_e4m3_t;
using Element = cutlass::bfloat16_t;  // the output, and the unread C
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, cutlass::layout::RowMajor*, 8, Element,
    cutlass::layout::RowMajor*, 8, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
using Mainloop = cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementIn, cute::tuple<cutlass::layout::RowMajor*, LayoutSFA*>,
    16, ElementIn, cute::tuple<cutlass::layout::ColumnMajor*, LayoutSFB*>, 16, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
using Shape = ProblemShape::UnderlyingProblemShape;
using StrideA = Kernel::InternalStrideA;
using StrideB = Kernel::InternalStrideB;
using StrideC = Kernel::InternalStrideC;
using StrideD = Kernel::InternalStrideD;

// CUTLASS's per-group argument arrays, carved from the caller's workspace.
struct Arrays {
    Shape* shapes;
    const ElementIn** a;
    const ElementIn** b;
    const Element** c;
    Element** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideC* stride_c;
    StrideD* stride_d;
    const float** sfa;
    const float** sfb;
    LayoutSFA* layout_sfa;
    LayoutSFB* layout_sfb;
};

// One thread per group: problem shape, operand and scale pointers, strides and scale layouts from the offsets.
__global__ void build_arguments(GroupedGemmFp8Params p, Arrays out) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p.num_groups) return;
    const int64_t begin = e > 0 ? p.offsets[e - 1] : 0, end = p.offsets[e];
    const int m = int(end > begin ? end - begin : 0), n = int(p.n), k = int(p.k);
    const int64_t k_blocks = (p.k + 127) / 128, n_blocks = (p.n + 127) / 128;
    out.shapes[e] = cute::make_shape(m, n, k);
    out.a[e] = static_cast<const ElementIn*>(p.x) + begin * p.k;
    out.b[e] = static_cast<const ElementIn*>(p.w) + int64_t(e) * p.n * p.k;
    out.d[e] = static_cast<Element*>(p.out) + begin * p.n;
    out.c[e] = out.d[e];
    out.stride_a[e] = stride_with_ld<StrideA>(p.k);
    out.stride_b[e] = stride_with_ld<StrideB>(p.k);
    out.stride_c[e] = stride_with_ld<StrideC>(p.n);
    out.stride_d[e] = stride_with_ld<StrideD>(p.n);
    out.sfa[e] = p.x_scale + begin * k_blocks;
    out.sfb[e] = p.w_scale + int64_t(e) * n_blocks * k_blocks;
    out.layout_sfa[e] = ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, n, k, 1));
    out.layout_sfb[e] = ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, n, k, 1));
}

// The persistent scheduler's hardware description; see sm90_bf16_grouped.inl's hardware_info.
cutlass::KernelHardwareInfo hardware_info(int device, int sm_count) {
    static std::mutex mutex;
    static std::vector<int> clusters_per_device;
    std::lock_guard<std::mutex> lock(mutex);
    if (device >= int(clusters_per_device.size())) clusters_per_device.resize(device + 1, 0);
    int& clusters = clusters_per_device[device];
    if (clusters == 0) clusters = max_active_clusters<Kernel>();
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    hw.max_active_clusters = clusters;
    return hw;
}

Gemm::Arguments make_arguments(int groups, int device, int sm_count, const Arrays& arr) {
    Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                         {groups, arr.shapes, nullptr},
                         {arr.a, arr.stride_a, arr.b, arr.stride_b, arr.sfa, arr.layout_sfa, arr.sfb, arr.layout_sfb},
                         {{}, arr.c, arr.stride_c, arr.d, arr.stride_d},
                         hardware_info(device, sm_count)};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
}

// The workspace: CUTLASS's per-group argument arrays, then CUTLASS's own workspace (its tensormaps).
struct Plan {
    WorkspacePlan arrays;
    int shapes, ptrs, stride_a, stride_b, stride_c, stride_d, layout_sfa, layout_sfb, cutlass;
};

Plan plan_for(int groups, int device, int sm_count) {
    const std::size_t n = std::size_t(groups);
    Plan p;
    p.shapes = p.arrays.add(n * sizeof(Shape));
    p.ptrs = p.arrays.add(6 * n * sizeof(void*));
    p.stride_a = p.arrays.add(n * sizeof(StrideA));
    p.stride_b = p.arrays.add(n * sizeof(StrideB));
    p.stride_c = p.arrays.add(n * sizeof(StrideC));
    p.stride_d = p.arrays.add(n * sizeof(StrideD));
    p.layout_sfa = p.arrays.add(n * sizeof(LayoutSFA));
    p.layout_sfb = p.arrays.add(n * sizeof(LayoutSFB));
    p.cutlass = p.arrays.add(Gemm::get_workspace_size(make_arguments(groups, device, sm_count, Arrays{})));
    return p;
}

}  // namespace

std::size_t workspace_sm90_fp8_blockwise(int num_groups, int device, int sm_count) {
    return num_groups > 0 ? plan_for(num_groups, device, sm_count).arrays.total : 0;
}

void run_sm90_fp8_blockwise(const GroupedGemmFp8Params& p, int device, int sm_count, cudaStream_t stream) {
    K2_NVTX_RANGE("k2::grouped_gemm_fp8[sm90 blockwise]");
    const int groups = p.num_groups;
    const std::size_t n = std::size_t(groups);
    const Plan plan = plan_for(groups, device, sm_count);
    expect_workspace(p.workspace, plan.arrays.total, "grouped_gemm_fp8");
    void* base = p.workspace.data;
    // The pointer arrays, slot j of the ptrs block.
    auto slot = [&](std::size_t j) { return plan.arrays.at<char>(base, plan.ptrs) + j * n * sizeof(void*); };
    const Arrays arrays{plan.arrays.at<Shape>(base, plan.shapes),
                        reinterpret_cast<const ElementIn**>(slot(0)),
                        reinterpret_cast<const ElementIn**>(slot(1)),
                        reinterpret_cast<const Element**>(slot(2)),
                        reinterpret_cast<Element**>(slot(3)),
                        plan.arrays.at<StrideA>(base, plan.stride_a),
                        plan.arrays.at<StrideB>(base, plan.stride_b),
                        plan.arrays.at<StrideC>(base, plan.stride_c),
                        plan.arrays.at<StrideD>(base, plan.stride_d),
                        reinterpret_cast<const float**>(slot(4)),
                        reinterpret_cast<const float**>(slot(5)),
                        plan.arrays.at<LayoutSFA>(base, plan.layout_sfa),
                        plan.arrays.at<LayoutSFB>(base, plan.layout_sfb)};
    build_arguments<<<unsigned((n + 127) / 128), 128, 0, stream>>>(p, arrays);
    check_cuda(cudaGetLastError(), "build_arguments launch");

    const Gemm::Arguments args = make_arguments(groups, device, sm_count, arrays);
    Gemm gemm;
    check_cutlass(gemm.can_implement(args), "can_implement");
    check_cutlass(gemm.initialize(args, plan.arrays.at<char>(base, plan.cutlass), stream), "initialize");
    check_cutlass(gemm.run(stream), "run");
}

}  // namespace k2::gemm
