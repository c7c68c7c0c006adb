// TensorView checks: contiguity rules and the wording of argument errors.
#include <gtest/gtest.h>

#include <string>

#include "common/check.h"
#include "common/tensor.h"

namespace {
k2::TensorView make(std::vector<int64_t> shape, std::vector<int64_t> strides, k2::DType dtype = k2::DType::Float32) {
    k2::TensorView t;
    t.shape = std::move(shape);
    t.strides = std::move(strides);
    t.dtype = dtype;
    return t;
}
}  // namespace

TEST(TensorView, Contiguity) {
    EXPECT_TRUE(make({4, 128}, {128, 1}).is_contiguous());
    EXPECT_FALSE(make({4, 128}, {1, 4}).is_contiguous());
    EXPECT_TRUE(make({1, 128}, {999, 1}).is_contiguous());  // size-1 dims may have any stride
    EXPECT_TRUE(make({0, 3}, {3, 1}).is_contiguous());
    EXPECT_TRUE(make({0, 3}, {1, 0}).is_contiguous());  // empty: contiguous whatever the strides, as in torch
    EXPECT_TRUE(make({3, 0, 2}, {7, 5, 3}).is_contiguous());
    EXPECT_EQ(make({2, 3, 4}, {12, 4, 1}).numel(), 24);
}

TEST(TensorView, ErrorsNameOpArgumentAndExpectation) {
    auto t = make({4, 128}, {128, 1}, k2::DType::Int32);
    try {
        k2::expect_dtype(t, "quantize_1x128", "x", {k2::DType::Float32, k2::DType::BFloat16});
        FAIL() << "expected an ArgumentError";
    } catch (const k2::ArgumentError& e) {
        std::string msg = e.what();
        EXPECT_NE(msg.find("k2.ops.quantize_1x128"), std::string::npos) << msg;
        EXPECT_NE(msg.find("'x'"), std::string::npos) << msg;
        EXPECT_NE(msg.find("float32 or bfloat16"), std::string::npos) << msg;
        EXPECT_NE(msg.find("int32"), std::string::npos) << msg;
    }
    EXPECT_THROW(k2::expect_shape(t, "op", "scale", {4, 1}), k2::ArgumentError);
    EXPECT_THROW(k2::expect_contiguous(make({4, 128}, {1, 4}), "op", "x"), k2::ArgumentError);
}

TEST(DType, NamesRoundTrip) {
    for (auto d :
         {k2::DType::Float32, k2::DType::BFloat16, k2::DType::Float8E4M3, k2::DType::Float8E5M2, k2::DType::Int32}) {
        EXPECT_EQ(k2::dtype_from_name(k2::dtype_name(d)), d);
    }
    EXPECT_EQ(k2::dtype_size(k2::DType::Float8E5M2), 1u);
    EXPECT_THROW(k2::dtype_from_name("complex64"), k2::ArgumentError);
    EXPECT_FALSE(k2::find_dtype("complex64").has_value());
    EXPECT_EQ(k2::find_dtype("bfloat16"), k2::DType::BFloat16);
}
