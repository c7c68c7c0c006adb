// Which kernel families this build holds, for which devices. Each family's register_<family>() records itself;
// k2.ops.available() reads the result.
#pragma once

#include <map>
#include <set>
#include <string>

namespace k2 {

// Whether this build of k2._C holds CUDA kernels; meaningful in the _C module's own sources (the */api.cpp
// binding files), which CMake compiles with K2_WITH_CUDA when CUDA is on.
#ifdef K2_WITH_CUDA
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

void add_kernel_family(const std::string& family, const std::string& device);
const std::map<std::string, std::set<std::string>>& kernel_families();

}  // namespace k2
