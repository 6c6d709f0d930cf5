// The linear kernels of cpu_kernels.cpp, for the other translation units of the library
// (decode_step.cpp). Same arguments as the torch ops quantchat::int4_linear / int8_linear.
#pragma once

#include <ATen/core/Tensor.h>

namespace quantchat_kernels {

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, int64_t in_features, int64_t path);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t path);

}  // namespace quantchat_kernels
