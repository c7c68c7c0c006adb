// The one extension module, k2._C. Each kernel family adds its functions through register_<family>(m).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>

#include "common/check.h"
#include "common/py_view.h"
#include "common/registry.h"
#include "common/thread_pool.h"

namespace py = pybind11;

namespace k2 {

// One register function per kernel family (csrc/<family>/api.cpp).
void register_moe(pybind11::module_& m);
void register_gemm(pybind11::module_& m);
void register_optim(pybind11::module_& m);
void register_quant(pybind11::module_& m);
void register_comm(pybind11::module_& m);
void register_attention(pybind11::module_& m);
void register_attention_decode(pybind11::module_& m);

namespace {

py::dict build_info() {
    py::dict info;
    info["native"] = true;
    info["version"] = K2_VERSION;
    info["compiler"] = K2_COMPILER;
#ifdef K2_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = K2_CUDA_VERSION;
    py::list archs;
    std::string all = K2_CUDA_ARCHITECTURES, cur;
    for (char c : all + ",") {
        if (c == ',') {
            if (!cur.empty()) archs.append(cur);
            cur.clear();
        } else {
            cur += c;
        }
    }
    info["cuda_architectures"] = archs;
#else
    info["cuda"] = false;
    info["cuda_version"] = py::none();
    info["cuda_architectures"] = py::list();
#endif
#ifdef K2_WITH_CUTLASS
    info["cutlass"] = true;  // the CUTLASS tensor-core GEMMs (sm90_*.cu / sm80_*.cu) are compiled in
#else
    info["cutlass"] = false;
#endif
    info["cpu_threads"] = num_threads();
    return info;
}

void register_common(py::module_& m) {
    m.def("build_info", &build_info, "How this extension was built: version, compiler, CUDA, architectures, CUTLASS.");
    m.def(
        "available", [] { return kernel_families(); },
        "Kernel families in this build and the device types ('cpu', 'cuda') each has kernels for.");
    m.def("num_threads", &num_threads, "Threads the CPU kernels use (K2_NUM_THREADS, default all cores).");
    m.def("set_num_threads", &set_num_threads, py::arg("n"), "Sets the CPU kernels' thread count.");
    m.def(
        "getenv",
        [](const std::string& name) -> py::object {
            const char* value = std::getenv(name.c_str());
            return value == nullptr ? py::none() : py::object(py::str(value));
        },
        py::arg("name"),
        "The process environment's value of `name`, or None. os.environ writes through to it; unlike "
        "os.environ.get, an unset name costs no exception (k2.ops reads K2_OPS on every dispatch).");
    m.def(
        "describe",
        [](const py::handle& obj) {
            PyTensor t = to_view(obj, "describe", "tensor");
            return t.view.describe();
        },
        py::arg("tensor"), "Validates a tensor view or DLPack object and describes it (for debugging the boundary).");
}

}  // namespace

}  // namespace k2

PYBIND11_MODULE(_C, m) {
    m.doc() = "k2's native kernels. Framework-neutral: tensors cross as validated views or DLPack.";
    py::register_exception<k2::UnsupportedError>(m, "UnsupportedError", PyExc_RuntimeError);
    k2::register_common(m);
    // Kernel families, one line each.
    k2::register_moe(m);
    k2::register_gemm(m);
    k2::register_optim(m);
    k2::register_quant(m);
    k2::register_comm(m);
    k2::register_attention(m);
    k2::register_attention_decode(m);
}
