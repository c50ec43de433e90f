// Argument checks shared by the CPU and CUDA implementations of the lowbit ops.
//
// They mirror python/lowbit/checks.py (which the reference and the fake
// implementations use): a wrong dtype raises TypeError (TORCH_CHECK_TYPE), a wrong
// shape, device or group size raises ValueError (TORCH_CHECK_VALUE), each naming the
// argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <utility>

namespace lowbit {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_dtype(at::ScalarType t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t), name, " must be float32, bfloat16 or float16, got ", t);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, " must be ", expected, ", got ",
                   t.scalar_type());
}

inline void check_matrix(const at::Tensor& t, at::ScalarType expected, const char* name) {
  check_dtype(t, expected, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name,
                    " must be contiguous (weights are stored row-major)");
}

inline void check_vector(const at::Tensor& t, at::ScalarType expected, int64_t n,
                         const char* name) {
  check_dtype(t, expected, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n,
                    ",), got ", t.sizes());
}

inline void check_grid(const at::Tensor& t, at::ScalarType expected, int64_t rows,
                       int64_t cols, const char* name) {
  check_dtype(t, expected, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
                    " must have shape (", rows, ", ", cols, "), got ", t.sizes());
}

inline void check_activation(const at::Tensor& x, const char* name) {
  check_float_dtype(x.scalar_type(), name);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, name,
                    " must have a non-empty last dimension, got ", x.sizes());
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias) return;
  check_float_dtype(bias->scalar_type(), "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n,
                    ",), got ", bias->sizes());
}

// All present tensors on the device of the first one.
inline void check_same_device(
    std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor* first = nullptr;
  const char* first_name = nullptr;
  for (const auto& [name, t] : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (first == nullptr) {
      first = t;
      first_name = name;
      continue;
    }
    TORCH_CHECK_VALUE(t->device() == first->device(),
                      "all tensors must be on one device, got ", first_name, " on ",
                      first->device(), " and ", name, " on ", t->device());
  }
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? &*t : nullptr;
}

inline void check_group_size(int64_t group_size, int64_t k) {
  TORCH_CHECK_VALUE(group_size == k || group_size == 32 || group_size == 64 ||
                        group_size == 128,
                    "group_size must be one of (32, 64, 128) or K = ", k, ", got ",
                    group_size);
  TORCH_CHECK_VALUE(k % group_size == 0, "K = ", k, " is not a multiple of group_size = ",
                    group_size);
}

inline void check_int8_weight(const at::Tensor& w, const at::Tensor& scale) {
  check_matrix(w, at::kChar, "w");
  check_contiguous(w, "w");
  check_vector(scale, at::kFloat, w.size(0), "w_scale");
  check_same_device({{"w", &w}, {"w_scale", &scale}});
}

// A calibrated (static) activation scale: one float32 on x's device.
inline void check_per_tensor_scale(const at::Tensor& x, const at::Tensor& x_scale) {
  check_dtype(x_scale, at::kFloat, "x_scale");
  TORCH_CHECK_VALUE(x_scale.numel() == 1, "x_scale must hold one per-tensor scale, got shape ", x_scale.sizes());
  check_same_device({{"x", &x}, {"x_scale", &x_scale}});
}

inline void check_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias) {
  check_activation(x, "x");
  check_int8_weight(w, scale);
  TORCH_CHECK_VALUE(x.size(-1) == w.size(1), "x has K = ", x.size(-1),
                    " features but w is [N, K] = ", w.sizes());
  check_bias(bias, w.size(0));
  check_same_device({{"x", &x}, {"w", &w}, {"bias", opt_ptr(bias)}});
}

inline void check_int4_weight(const at::Tensor& packed, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, int64_t group_size) {
  check_matrix(packed, at::kByte, "packed");
  check_contiguous(packed, "packed");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  check_group_size(group_size, k);
  check_grid(scales, at::kFloat, n, k / group_size, "scales");
  check_contiguous(scales, "scales");
  if (zeros) {
    check_grid(*zeros, at::kByte, n, k / group_size, "zeros");
    check_contiguous(*zeros, "zeros");
  }
  check_same_device({{"packed", &packed}, {"scales", &scales}, {"zeros", opt_ptr(zeros)}});
}

inline void check_int4_linear(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                              int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_activation(x, "x");
  check_int4_weight(packed, scales, zeros, group_size);
  TORCH_CHECK_VALUE(x.size(-1) == packed.size(1) * 2, "x has K = ", x.size(-1),
                    " features but the int4 weight has K = ", packed.size(1) * 2);
  check_bias(bias, packed.size(0));
  check_same_device({{"x", &x}, {"packed", &packed}, {"bias", opt_ptr(bias)}});
}

inline void check_int8_scaled_mm(const at::Tensor& a, const at::Tensor& b,
                                 const at::Tensor& a_scale, const at::Tensor& b_scale,
                                 const std::optional<at::Tensor>& bias,
                                 at::ScalarType out_dtype) {
  check_matrix(a, at::kChar, "a");
  check_matrix(b, at::kChar, "b");
  check_contiguous(b, "b");
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "a is [M, K] = ", a.sizes(), " but b is [N, K] = ",
                    b.sizes());
  check_vector(a_scale, at::kFloat, a.size(0), "a_scale");
  check_vector(b_scale, at::kFloat, b.size(0), "b_scale");
  check_bias(bias, b.size(0));
  check_float_dtype(out_dtype, "out_dtype");
  check_same_device({{"a", &a},
                     {"b", &b},
                     {"a_scale", &a_scale},
                     {"b_scale", &b_scale},
                     {"bias", opt_ptr(bias)}});
}

}  // namespace lowbit
