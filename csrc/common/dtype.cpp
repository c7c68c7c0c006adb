#include "common/dtype.h"

#include "common/check.h"

namespace k2 {

namespace {
struct DTypeInfo {
    DType dtype;
    const char* name;
    std::size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::Float32, "float32", 4},
    {DType::Float16, "float16", 2},
    {DType::BFloat16, "bfloat16", 2},
    {DType::Float8E4M3, "float8_e4m3fn", 1},
    {DType::Float8E5M2, "float8_e5m2", 1},
    {DType::Int32, "int32", 4},
    {DType::Int64, "int64", 8},
    {DType::UInt8, "uint8", 1},
    {DType::Bool, "bool", 1},
};
}  // namespace

std::optional<DType> find_dtype(const std::string& name) {
    for (const auto& info : kDTypes)
        if (name == info.name) return info.dtype;
    return std::nullopt;
}

DType dtype_from_name(const std::string& name) {
    if (auto dtype = find_dtype(name)) return *dtype;
    throw ArgumentError("k2: unsupported dtype '" + name + "'");
}

const char* dtype_name(DType dtype) {
    return kDTypes[static_cast<int>(dtype)].name;
}

std::size_t dtype_size(DType dtype) {
    return kDTypes[static_cast<int>(dtype)].size;
}

}  // namespace k2
