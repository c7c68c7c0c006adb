#include "common/tensor.h"

#include <sstream>

#include "common/check.h"

namespace k2 {

namespace {
std::string join(const std::vector<int64_t>& v) {
    std::ostringstream os;
    os << "[";
    for (std::size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
    os << "]";
    return os.str();
}
}  // namespace

int64_t TensorView::numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
}

bool TensorView::is_contiguous() const {
    if (numel() == 0) return true;  // as torch: an empty tensor is contiguous whatever its strides
    int64_t expected = 1;
    for (int64_t d = ndim() - 1; d >= 0; --d) {
        if (shape[d] != 1 && strides[d] != expected) return false;
        expected *= shape[d];
    }
    return true;
}

std::string TensorView::describe() const {
    return detail::concat(dtype_name(dtype), join(shape), " strides ", join(strides), " on ",
                          device == DeviceType::CPU ? "cpu" : "cuda");
}

void expect_dtype(const TensorView& t, const char* op, const char* arg, std::initializer_list<DType> allowed) {
    std::string names;
    for (DType d : allowed) {
        if (t.dtype == d) return;
        names += (names.empty() ? "" : " or ") + std::string(dtype_name(d));
    }
    fail_argument(op, arg, "expected dtype ", names, ", got ", dtype_name(t.dtype));
}

void expect_ndim(const TensorView& t, const char* op, const char* arg, int64_t ndim) {
    K2_CHECK_ARG(t.ndim() == ndim, op, arg, "expected a ", ndim, "-D tensor, got ", t.describe());
}

void expect_contiguous(const TensorView& t, const char* op, const char* arg) {
    K2_CHECK_ARG(t.is_contiguous(), op, arg, "expected a contiguous tensor, got ", t.describe());
}

void expect_shape(const TensorView& t, const char* op, const char* arg, const std::vector<int64_t>& shape) {
    K2_CHECK_ARG(t.shape == shape, op, arg, "expected shape ", join(shape), ", got ", t.describe());
}

void expect_same_device(const TensorView& a, const TensorView& b, const char* op, const char* arg) {
    K2_CHECK_ARG(a.device == b.device && a.device_index == b.device_index, op, arg,
                 "expected a tensor on the same device as the input, got ", b.describe());
}

}  // namespace k2
