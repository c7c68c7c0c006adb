// Body of one CUTLASS 3.x Hopper grouped GEMM (bf16), included by sm90_bf16_<layout>.cu after it names
// K2_LAYOUT_A / K2_LAYOUT_B. Kernel: ptr-array, TMA loads + warp-specialised cooperative WGMMA (two consumer
// warpgroups on a 128x128x64 tile, a 1x2 cluster multicasting A), persistent group tile scheduler, TMA-store
// epilogue D = alpha * acc + beta * C. The per-group problem shapes, pointers and strides are written on the
// device by build_arguments from the int32 offsets (one thread per group), so the host never reads them. All of it
// lives in the caller's workspace (workspace_bytes), none is allocated here.
#include <mutex>
#include <vector>

#include "gemm/sm90_grouped.cuh"

namespace k2::gemm {
namespace {

using Element = cutlass::bfloat16_t;
constexpr int kAlignment = 8;  // elements per 16-byte vector
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, cutlass::layout::RowMajor*, kAlignment,
    Element, cutlass::layout::RowMajor*, kAlignment, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
using Mainloop = cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, K2_LAYOUT_A*, kAlignment, Element, K2_LAYOUT_B*,
    kAlignment, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
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
    const Element** a;
    const Element** b;
    const Element** c;
    Element** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideC* stride_c;
    StrideD* stride_d;
};

__global__ void build_arguments(GroupedDesc desc, const Element* a, const Element* b, const Element* c, Element* d,
                                Arrays out) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= desc.num_groups) return;
    int64_t begin = 0, end = 0;
    if (desc.mode != GroupedMode::kBatch) begin = e > 0 ? desc.offsets[e - 1] : 0, end = desc.offsets[e];
    const GroupProblem g = group_problem(desc, e, begin, end);
    out.shapes[e] = cute::make_shape(g.m, g.n, g.k);
    out.a[e] = a + g.a_offset;
    out.b[e] = b + g.b_offset;
    out.c[e] = c + g.c_offset;
    out.d[e] = d + g.d_offset;
    out.stride_a[e] = stride_with_ld<StrideA>(g.lda);
    out.stride_b[e] = stride_with_ld<StrideB>(g.ldb);
    out.stride_c[e] = stride_with_ld<StrideC>(g.ldc);
    out.stride_d[e] = stride_with_ld<StrideD>(g.ldd);
}

// The hardware the persistent tile scheduler sizes its grid for: the SM count, and how many 1x2 clusters of this
// kernel fit on the device at once (its shared memory and cluster shape limit that below sm_count / 2 when GPCs
// cannot host whole clusters on every SM). Queried once per device, on that device (the caller's current one).
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

Gemm::Arguments make_arguments(const GroupedRun& r, const Arrays& arr) {
    Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                         {r.desc.num_groups, arr.shapes, nullptr},
                         {arr.a, arr.stride_a, arr.b, arr.stride_b},
                         {{}, arr.c, arr.stride_c, arr.d, arr.stride_d},
                         hardware_info(r.device, r.sm_count)};
    args.epilogue.thread.alpha = r.alpha;
    args.epilogue.thread.beta = r.beta;
    return args;
}

// The workspace: CUTLASS's per-group argument arrays, then CUTLASS's own workspace (its tensormaps).
struct Plan {
    WorkspacePlan arrays;
    int shapes, ptrs, stride_a, stride_b, stride_c, stride_d, cutlass;
};

Plan plan_for(const GroupedRun& r) {
    const std::size_t groups = std::size_t(r.desc.num_groups);
    Plan p;
    p.shapes = p.arrays.add(groups * sizeof(Shape));
    p.ptrs = p.arrays.add(4 * groups * sizeof(void*));
    p.stride_a = p.arrays.add(groups * sizeof(StrideA));
    p.stride_b = p.arrays.add(groups * sizeof(StrideB));
    p.stride_c = p.arrays.add(groups * sizeof(StrideC));
    p.stride_d = p.arrays.add(groups * sizeof(StrideD));
    p.cutlass = p.arrays.add(Gemm::get_workspace_size(make_arguments(r, Arrays{})));
    return p;
}

std::size_t workspace_bytes(const GroupedRun& r) {
    return r.desc.num_groups > 0 ? plan_for(r).arrays.total : 0;
}

void run_grouped(const GroupedRun& r, const char* name) {
    K2_NVTX_RANGE(name);
    const Plan plan = plan_for(r);
    expect_workspace(r.workspace, plan.arrays.total, "grouped_gemm");
    void* base = r.workspace.data;
    const std::size_t groups = std::size_t(r.desc.num_groups);
    // The pointer arrays, slot j of the ptrs block.
    auto slot = [&](std::size_t j) { return plan.arrays.at<char>(base, plan.ptrs) + j * groups * sizeof(void*); };
    const Arrays arrays{plan.arrays.at<Shape>(base, plan.shapes),     reinterpret_cast<const Element**>(slot(0)),
                        reinterpret_cast<const Element**>(slot(1)),   reinterpret_cast<const Element**>(slot(2)),
                        reinterpret_cast<Element**>(slot(3)),         plan.arrays.at<StrideA>(base, plan.stride_a),
                        plan.arrays.at<StrideB>(base, plan.stride_b), plan.arrays.at<StrideC>(base, plan.stride_c),
                        plan.arrays.at<StrideD>(base, plan.stride_d)};
    build_arguments<<<unsigned((groups + 127) / 128), 128, 0, r.stream>>>(
        r.desc, static_cast<const Element*>(r.a), static_cast<const Element*>(r.b),
        static_cast<const Element*>(r.c ? r.c : r.d), static_cast<Element*>(r.d), arrays);
    check_cuda(cudaGetLastError(), "build_arguments launch");

    const Gemm::Arguments args = make_arguments(r, arrays);
    Gemm gemm;
    check_cutlass(gemm.can_implement(args), "can_implement");
    check_cutlass(gemm.initialize(args, plan.arrays.at<char>(base, plan.cutlass), r.stream), "initialize");
    check_cutlass(gemm.run(r.stream), "run");
}

}  // namespace
}  // namespace k2::gemm
