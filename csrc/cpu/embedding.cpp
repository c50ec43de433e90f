// CPU lookups in quantized embedding tables.
//
// Algorithm: for each id, dequantize only that row of the table, in fp32, and write it in
// the output dtype: int8 rows as q * s[row] (one scale per row); int4 rows as
// (q - z) * s per group of G consecutive columns, through the same row routine as
// dequantize_int4 (csrc/cpu/quantize.cpp), so a lookup equals the dequantized table's row
// bit for bit, as python/lowbit/reference.py's embedding_int8 / embedding_int4 define it.
// Layout: the canonical weight formats (docs/design.md), a table [V, D] stored like a
// Linear weight [N, K]. Limits: ids int64 or int32 of any shape, each in [0, V) (checked:
// an out-of-range id raises, naming it); parallel over ids with ATen's thread pool.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/quantize.h"

namespace lowbit::cpu {
namespace {

// The ids as int64, each checked against the table's V rows.
std::vector<int64_t> checked_ids(const at::Tensor& ids, int64_t rows) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "embedding ids must be int64 or int32, got ", ids.scalar_type());
  const at::Tensor flat = ids.contiguous().view({-1}).to(at::kLong);
  const int64_t* p = flat.const_data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + flat.numel());
  for (int64_t id : out)
    TORCH_CHECK_INDEX(id >= 0 && id < rows, "embedding id ", id, " is out of range for a table of ", rows,
                      " rows");
  return out;
}

std::vector<int64_t> out_shape(const at::Tensor& ids, int64_t d) {
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(d);
  return shape;
}

at::Tensor embedding_int8(const at::Tensor& ids, const at::Tensor& w, const at::Tensor& scale,
                          at::ScalarType dtype) {
  check_int8_weight(w, scale);
  check_float_dtype(dtype, "dtype");
  check_same_device({{"ids", &ids}, {"w", &w}});
  const int64_t d = w.size(1);
  const std::vector<int64_t> rows = checked_ids(ids, w.size(0));
  at::Tensor out = at::empty(out_shape(ids, d), w.options().dtype(dtype));
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "embedding_int8", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(rows.size()), 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int8_t* row = wp + rows[i] * d;
        const float s = sp[rows[i]];
        for (int64_t j = 0; j < d; ++j) op[i * d + j] = static_cast<scalar_t>(static_cast<float>(row[j]) * s);
      }
    });
  });
  return out;
}

at::Tensor embedding_int4(const at::Tensor& ids, const at::Tensor& packed, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, int64_t group_size, at::ScalarType dtype) {
  check_int4_weight(packed, scales, zeros, group_size);
  check_float_dtype(dtype, "dtype");
  check_same_device({{"ids", &ids}, {"packed", &packed}});
  const int64_t d = packed.size(1) * 2, groups = d / group_size;
  const std::vector<int64_t> rows = checked_ids(ids, packed.size(0));
  at::Tensor out = at::empty(out_shape(ids, d), packed.options().dtype(dtype));
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scales.const_data_ptr<float>();
  const uint8_t* zp = zeros ? zeros->const_data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "embedding_int4", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(rows.size()), 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(d);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = rows[i];
        dequantize_int4_row(pp + r * (d / 2), sp + r * groups, zp ? zp + r * groups : nullptr, group_size, d,
                            row.data());
        for (int64_t j = 0; j < d; ++j) op[i * d + j] = static_cast<scalar_t>(row[j]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("embedding_int8", &embedding_int8);
  m.impl("embedding_int4", &embedding_int4);
}

}  // namespace lowbit::cpu
