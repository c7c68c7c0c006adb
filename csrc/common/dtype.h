// Element types that cross the native boundary, named as torch names them (without the "torch." prefix).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace k2 {

enum class DType : uint8_t { Float32, Float16, BFloat16, Float8E4M3, Float8E5M2, Int32, Int64, UInt8, Bool };

// Parses "float32", "bfloat16", "float8_e4m3fn", ...; nullopt for an unknown name.
std::optional<DType> find_dtype(const std::string& name);
// As find_dtype, but throws k2::ArgumentError for an unknown name.
DType dtype_from_name(const std::string& name);
const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);
inline bool is_float8(DType d) {
    return d == DType::Float8E4M3 || d == DType::Float8E5M2;
}

}  // namespace k2
