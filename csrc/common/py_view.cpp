#include "common/py_view.h"

#include <pybind11/stl.h>

#include <string>
#include <string_view>
#include <vector>

#include "common/check.h"

namespace py = pybind11;

namespace k2 {

namespace {

// The DLPack ABI (dmlc/dlpack, v0.8-compatible part), declared here to avoid a vendored header.
struct DLDevice {
    int32_t device_type;  // 1 = CPU, 2 = CUDA, 3 = CUDA host
    int32_t device_id;
};
struct DLDataType {
    uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 6 bool, 10 float8_e4m3fn, 12 float8_e5m2
    uint8_t bits;
    uint16_t lanes;
};
struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;  // may be null: compact row-major
    uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor*);
};

DType dtype_from_dlpack(DLDataType t, const char* op, const char* arg) {
    K2_CHECK_ARG(t.lanes == 1, op, arg, "expected scalar (1-lane) DLPack elements, got ", t.lanes, " lanes");
    switch (t.code) {
        case 0:
            if (t.bits == 32) return DType::Int32;
            if (t.bits == 64) return DType::Int64;
            break;
        case 1:
            if (t.bits == 8) return DType::UInt8;
            break;
        case 2:
            if (t.bits == 32) return DType::Float32;
            if (t.bits == 16) return DType::Float16;
            break;
        case 4:
            if (t.bits == 16) return DType::BFloat16;
            break;
        case 6:
            return DType::Bool;
        case 10:
            return DType::Float8E4M3;
        case 12:
            return DType::Float8E5M2;
    }
    fail_argument(op, arg, "unsupported DLPack dtype (code ", int(t.code), ", ", int(t.bits), " bits)");
}

// DLPack device types this boundary reads: CPU, CUDA, CUDA host (pinned) memory.
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3;

PyTensor from_dlpack(const py::handle& obj, const char* op, const char* arg, uintptr_t stream) {
    // A CUDA producer gets the consumer's stream; 0 (legacy default) is spelled 1 in the protocol, where 0 is
    // disallowed. CPU producers get no stream argument (NumPy rejects any).
    bool cuda = false;
    if (py::hasattr(obj, "__dlpack_device__")) {
        py::tuple device = obj.attr("__dlpack_device__")();
        cuda = device.size() >= 1 && device[0].cast<int32_t>() == kDLCUDA;
    }
    py::object capsule = cuda ? obj.attr("__dlpack__")(py::arg("stream") = stream == 0 ? uintptr_t(1) : stream)
                              : obj.attr("__dlpack__")();
    K2_CHECK_ARG(PyCapsule_IsValid(capsule.ptr(), "dltensor"), op, arg, "__dlpack__ did not return a DLPack capsule");
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    const DLTensor& t = managed->dl_tensor;
    PyTensor out;
    out.owner = capsule;
    out.view.data = static_cast<char*>(t.data) + t.byte_offset;
    out.view.shape.assign(t.shape, t.shape + t.ndim);
    if (t.strides) {
        out.view.strides.assign(t.strides, t.strides + t.ndim);
    } else {
        out.view.strides.resize(t.ndim);
        int64_t s = 1;
        for (int d = t.ndim - 1; d >= 0; --d) out.view.strides[d] = s, s *= t.shape[d];
    }
    out.view.dtype = dtype_from_dlpack(t.dtype, op, arg);
    const int32_t type = t.device.device_type;
    K2_CHECK_ARG(type == kDLCPU || type == kDLCUDA || type == kDLCUDAHost, op, arg,
                 "expected a CPU or CUDA DLPack tensor, got device type ", type);
    out.view.device = type == kDLCUDA ? DeviceType::CUDA : DeviceType::CPU;
    out.view.device_index = t.device.device_id;
    return out;
}

// A tuple of Python ints (torch.Size is one) into `out`; false (nothing raised) for anything else, which the caller
// then converts through pybind11 to get its error message.
bool int64s_from_tuple(PyObject* obj, std::vector<int64_t>& out) {
    if (!PyTuple_Check(obj)) return false;
    const Py_ssize_t n = PyTuple_GET_SIZE(obj);
    out.resize(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* item = PyTuple_GET_ITEM(obj, i);
        if (!PyLong_CheckExact(item)) return false;
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return false;
        }
        out[static_cast<std::size_t>(i)] = v;
    }
    return true;
}

// The view tuple read with the CPython API: this runs for every tensor of every launch (a decode step launches per
// layer), where pybind11's generic casters cost several times the small kernels they feed. Returns false for
// anything unusual (the caller then takes the checked pybind11 path and its error messages).
bool from_tuple_fast(PyObject* tup, PyTensor& out) {
    PyObject* data = PyTuple_GET_ITEM(tup, 0);
    PyObject* dtype = PyTuple_GET_ITEM(tup, 3);
    PyObject* device = PyTuple_GET_ITEM(tup, 4);
    PyObject* index = PyTuple_GET_ITEM(tup, 5);
    if (!PyLong_CheckExact(data) || !PyUnicode_CheckExact(dtype) || !PyUnicode_CheckExact(device) ||
        !PyLong_CheckExact(index))
        return false;
    if (!int64s_from_tuple(PyTuple_GET_ITEM(tup, 1), out.view.shape) ||
        !int64s_from_tuple(PyTuple_GET_ITEM(tup, 2), out.view.strides))
        return false;
    const unsigned long long ptr = PyLong_AsUnsignedLongLong(data);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return false;
    }
    const long device_index = PyLong_AsLong(index);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return false;
    }
    Py_ssize_t n = 0;
    const char* name = PyUnicode_AsUTF8AndSize(dtype, &n);
    if (name == nullptr) {
        PyErr_Clear();
        return false;
    }
    const auto found = find_dtype(std::string(name, static_cast<std::size_t>(n)));
    const char* dev = PyUnicode_AsUTF8AndSize(device, &n);
    if (!found || dev == nullptr) {
        PyErr_Clear();
        return false;
    }
    const std::string_view dev_name(dev, static_cast<std::size_t>(n));
    if (dev_name != "cpu" && dev_name != "cuda") return false;
    out.view.data = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
    out.view.dtype = *found;
    out.view.device = dev_name == "cuda" ? DeviceType::CUDA : DeviceType::CPU;
    out.view.device_index = static_cast<int>(device_index);
    return true;
}

// The same through pybind11's casters, with an error message naming what is wrong.
void from_tuple_checked(const py::tuple& tup, const char* op, const char* arg, PyTensor& out) {
    try {
        out.view.data = reinterpret_cast<void*>(tup[0].cast<uintptr_t>());
        out.view.shape = tup[1].cast<std::vector<int64_t>>();
        out.view.strides = tup[2].cast<std::vector<int64_t>>();
        auto dtype_name = tup[3].cast<std::string>();
        auto dtype = find_dtype(dtype_name);
        K2_CHECK_ARG(dtype.has_value(), op, arg, "unsupported dtype '", dtype_name, "'");
        out.view.dtype = *dtype;
        auto device = tup[4].cast<std::string>();
        K2_CHECK_ARG(device == "cpu" || device == "cuda", op, arg, "expected device 'cpu' or 'cuda', got '", device,
                     "'");
        out.view.device = device == "cuda" ? DeviceType::CUDA : DeviceType::CPU;
        out.view.device_index = tup[5].cast<int>();
    } catch (const py::cast_error& e) {
        fail_argument(op, arg, "malformed view tuple (", e.what(), ")");
    } catch (const ArgumentError&) {
        throw;
    } catch (const std::invalid_argument& e) {
        fail_argument(op, arg, e.what());
    }
}

PyTensor from_tuple(const py::tuple& tup, const char* op, const char* arg) {
    K2_CHECK_ARG(tup.size() == 6, op, arg,
                 "expected a view (data_ptr, shape, strides, dtype, device_type, device_index), got a tuple of ",
                 tup.size(), " items");
    PyTensor out;
    if (!from_tuple_fast(tup.ptr(), out)) from_tuple_checked(tup, op, arg, out);
    K2_CHECK_ARG(out.view.shape.size() == out.view.strides.size(), op, arg, "shape has ", out.view.shape.size(),
                 " dims but strides has ", out.view.strides.size());
    for (int64_t s : out.view.shape) K2_CHECK_ARG(s >= 0, op, arg, "negative size in shape");
    K2_CHECK_ARG(out.view.data != nullptr || out.view.numel() == 0, op, arg,
                 "null data pointer for a non-empty tensor");
    return out;
}

}  // namespace

PyTensor to_view(const py::handle& obj, const char* op, const char* arg, uintptr_t stream) {
    if (py::isinstance<py::tuple>(obj)) return from_tuple(obj.cast<py::tuple>(), op, arg);
    if (py::hasattr(obj, "__dlpack__")) return from_dlpack(obj, op, arg, stream);
    fail_argument(op, arg, "expected a tensor view tuple or an object with __dlpack__, got ",
                  std::string(py::str(obj.get_type().attr("__name__"))));
}

PyTensor to_workspace(const py::handle& obj, const TensorView& like, const char* op, uintptr_t stream) {
    if (obj.is_none()) {  // no scratch needed: an empty workspace on the operands' device
        PyTensor ws;
        ws.view.shape = {0};
        ws.view.strides = {1};
        ws.view.dtype = DType::UInt8;
        ws.view.device = like.device;
        ws.view.device_index = like.device_index;
        return ws;
    }
    PyTensor ws = to_view(obj, op, "workspace", stream);
    expect_ndim(ws.view, op, "workspace", 1);
    expect_dtype(ws.view, op, "workspace", {DType::UInt8});
    expect_contiguous(ws.view, op, "workspace");
    expect_same_device(like, ws.view, op, "workspace");
    return ws;
}

void expect_device_supported(const TensorView& t, const char* op, const char* arg, bool has_cuda_kernel) {
    if (t.device == DeviceType::CUDA && !has_cuda_kernel)
        throw UnsupportedError(detail::concat("k2.ops.", op, ": argument '", arg,
                                              "' is a CUDA tensor, but this build of k2 has no CUDA kernel for it "
                                              "(rebuild with nvcc available and K2_CUDA=ON)"));
}

}  // namespace k2
