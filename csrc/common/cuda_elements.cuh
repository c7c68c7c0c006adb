// Shared by the CUDA kernel families: fp32 conversion of the floating element types that cross the boundary,
// dispatch from k2::DType to the CUDA element type, and a CUDA error check that names the family.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"

namespace k2::cu {

// Throws std::runtime_error("k2 FAMILY: WHAT: <CUDA's message>") when err is not cudaSuccess.
inline void check(cudaError_t err, const char* family, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("k2 ") + family + ": " + what + ": " + cudaGetErrorString(err));
}

// Makes CUDA device `device` current for its lifetime, then restores the previous one. For host functions that
// take an explicit device index (the workspace queries); the ops themselves run on the current device, which
// k2.ops makes the tensors' device.
class ScopedDevice {
  public:
    explicit ScopedDevice(int device) {
        check(cudaGetDevice(&previous_), "device", "cudaGetDevice");
        if (device != previous_) check(cudaSetDevice(device), "device", "cudaSetDevice");
        changed_ = device != previous_;
    }
    ~ScopedDevice() {
        if (changed_) cudaSetDevice(previous_);
    }
    ScopedDevice(const ScopedDevice&) = delete;
    ScopedDevice& operator=(const ScopedDevice&) = delete;

  private:
    int previous_ = 0;
    bool changed_ = false;
};

__device__ __forceinline__ float to_f32(float v) {
    return v;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
__device__ __forceinline__ float to_f32(__half v) {
    return __half2float(v);
}

// v rounded to the nearest T (ties to even), as torch's casts round.
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
    if constexpr (std::is_same_v<T, float>)
        return v;
    else if constexpr (std::is_same_v<T, __nv_bfloat16>)
        return __float2bfloat16(v);
    else
        return __float2half(v);
}

// Calls fn(T{}) with T the CUDA type of a float32, bfloat16 or float16 dtype; throws for any other dtype.
template <typename Fn>
void dispatch_float(DType dtype, const char* family, Fn&& fn) {
    switch (dtype) {
        case DType::Float32:
            return fn(float{});
        case DType::BFloat16:
            return fn(__nv_bfloat16{});
        case DType::Float16:
            return fn(__half{});
        default:
            throw std::invalid_argument(std::string("k2 ") + family + ": unsupported dtype " + dtype_name(dtype));
    }
}

}  // namespace k2::cu
