// CUTLASS 3.x Hopper grouped GEMM, bf16, A RowMajor / B ColumnMajor (see sm90_bf16_grouped.inl). sm_90a only.
#include <cutlass/layout/matrix.h>

#define K2_LAYOUT_A cutlass::layout::RowMajor
#define K2_LAYOUT_B cutlass::layout::ColumnMajor
#include "gemm/sm90_bf16_grouped.inl"

namespace k2::gemm {

void run_sm90_bf16_row_col(const GroupedRun& r) {
    run_grouped(r, "k2::grouped_gemm[sm90 bf16 row_col]");
}

std::size_t workspace_sm90_bf16_row_col(const GroupedRun& r) {
    return workspace_bytes(r);
}

}  // namespace k2::gemm
