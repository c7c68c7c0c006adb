// Argument checks at the native boundary. Every message names the op, the argument and what was expected, so
// a Python user sees e.g. "k2.ops.quantize_1x128: argument 'x': expected a contiguous last dim, got strides ...".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace k2 {

// Bad input to an op. pybind11 turns it into a Python ValueError.
class ArgumentError : public std::invalid_argument {
  public:
    using std::invalid_argument::invalid_argument;
};

// A valid request this build cannot serve (e.g. a CUDA tensor when no CUDA kernel was compiled).
// pybind11 turns it into a Python RuntimeError.
class UnsupportedError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Parts>
std::string concat(Parts&&... parts) {
    std::ostringstream os;
    (os << ... << std::forward<Parts>(parts));
    return os.str();
}
}  // namespace detail

template <typename... Parts>
[[noreturn]] void fail_argument(const std::string& op, const std::string& arg, Parts&&... what) {
    throw ArgumentError(detail::concat("k2.ops.", op, ": argument '", arg, "': ", std::forward<Parts>(what)...));
}

}  // namespace k2

// K2_CHECK_ARG(cond, op, arg, message parts...): throws k2::ArgumentError naming op and argument.
#define K2_CHECK_ARG(cond, op, arg, ...)                        \
    do {                                                        \
        if (!(cond)) ::k2::fail_argument(op, arg, __VA_ARGS__); \
    } while (0)
