// Python objects -> TensorView, compiled only into the extension module (cpp_tests never need Python).
//
// Two forms are accepted:
//  - the tuple (data_ptr, shape, strides, dtype_name, device_type, device_index) that k2.ops builds from a
//    torch tensor (strides in elements; device_type "cpu" or "cuda");
//  - any object with __dlpack__ (NumPy, CuPy, JAX, torch): the DLPack capsule is read and kept alive, not
//    consumed, for as long as the PyTensor lives. A CUDA producer (__dlpack_device__ says so) is passed the
//    op's stream as __dlpack__(stream=...), so that it orders its pending work on the tensor before the op's
//    work on that stream (DLPack's stream handshake; the legacy default stream 0 is passed as 1, as the protocol
//    asks).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/tensor.h"
#include "common/workspace.h"

namespace k2 {

struct PyTensor {
    TensorView view;
    pybind11::object owner;  // keeps a DLPack capsule (and so its memory) alive
};

// `stream`: the cudaStream_t handle the op runs on (0: the legacy default stream), for the DLPack handshake.
PyTensor to_view(const pybind11::handle& obj, const char* op, const char* arg, uintptr_t stream = 0);

// The `workspace` argument of an op: a 1-D uint8 tensor on `like`'s device, of any size (the kernels check it holds
// what their *_workspace_size query says; an empty one serves the CPU kernels and empty problems).
PyTensor to_workspace(const pybind11::handle& obj, const TensorView& like, const char* op, uintptr_t stream);
inline Workspace as_workspace(const PyTensor& t) {
    return {t.view.data, static_cast<std::size_t>(t.view.numel())};
}

// Rejects a CUDA view when this build has no CUDA kernel for the op.
void expect_device_supported(const TensorView& t, const char* op, const char* arg, bool has_cuda_kernel);

}  // namespace k2
