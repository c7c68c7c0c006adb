#include "common/registry.h"

namespace k2 {

namespace {
std::map<std::string, std::set<std::string>>& families() {
    static std::map<std::string, std::set<std::string>> table;
    return table;
}
}  // namespace

void add_kernel_family(const std::string& family, const std::string& device) {
    families()[family].insert(device);
}

const std::map<std::string, std::set<std::string>>& kernel_families() {
    return families();
}

}  // namespace k2
