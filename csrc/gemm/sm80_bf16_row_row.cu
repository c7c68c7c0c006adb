// CUTLASS 2.x grouped GEMM, bf16, A RowMajor / B RowMajor (see sm80_grouped.cuh). Compiled for sm_80 only.
#include "gemm/sm80_grouped.cuh"

namespace k2::gemm {

void run_sm80_bf16_row_row(const GroupedRun& r) {
    run_sm80_grouped<Sm80Bf16Config<cutlass::layout::RowMajor, cutlass::layout::RowMajor>>(
        r, "k2::grouped_gemm[sm80 bf16 row_row]");
}

std::size_t workspace_sm80_bf16_row_row(const GroupedRun& r) {
    return sm80_workspace<Sm80Bf16Config<cutlass::layout::RowMajor, cutlass::layout::RowMajor>>(r);
}

}  // namespace k2::gemm
