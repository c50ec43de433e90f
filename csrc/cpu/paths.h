// The CPU kernel paths: the one table of the `path` argument of the prepacked linear ops.
//
// A path fixes which kernel a prepacked op runs, whatever M is; kAuto (-1) lets the op
// choose by M, the activations' dtype and the current ISA. A tuned plan
// (python/lowbit/plan.py) stores a path *name* per M bucket and passes its id; Python
// reads this table through lowbit._C.kernel_paths(), so ids and names live only here.
// Ids are unique across the two op families, so an int8 path handed to a weight-only op
// (or the reverse) is an error, never another kernel.
#pragma once

#include <cstdint>
#include <string>

#include "cpu/isa.h"

namespace lowbit::cpu {

// Which prepacked ops a path belongs to.
enum class Family {
  kInt8,        // w8a8_linear_prepacked (W8A8, W8A8 static)
  kWeightOnly,  // w4a16_linear_prepacked, w8a16_linear_prepacked
};

enum class Path : int64_t {
  kAuto = -1,
  // int8 GEMM: one per ISA (AMX below one tile of 16 rows runs VNNI).
  kInt8Scalar = 0,
  kInt8Avx2 = 1,
  kInt8Avx512Vnni = 2,
  kInt8Amx = 3,
  // weight-only GEMM.
  kWoScalar = 10,    // portable C++, weights dequantized to fp32 blocks
  kWoGemm = 11,      // AVX-512: weight blocks dequantized once to fp32, FMA micro-kernel over all rows
  kWoGemv = 12,      // AVX-512: weights widened in registers from the packed bytes, 8 rows at a time
  kWoGemvVnni = 13,  // bf16 activations: rows in block floating point, codes x digits with vpdpbusd
  kWoAmx = 14,       // bf16 activations on AMX-BF16 tiles, (q - z) or q decoded to bf16 per block
  kWoBf16 = 15,      // bf16 activations on AVX512-BF16 (vdpbf16ps), the same decoded blocks, no AMX
  kWoGemmAvx2 = 16,  // AVX2 + FMA: the gemm path with 8-float vectors
  kWoGemvAvx2 = 17,  // AVX2 + FMA: the gemv path with 8-float vectors
  kWoGemvIntAvx2 = 18,  // AVX2, bf16 activations, int4: rows in block floating point, codes x digits (vpmaddubsw)
};

struct PathInfo {
  Path path;
  const char* name;  // unique within its family; what plans store
  Family family;
};

inline constexpr PathInfo kPaths[] = {
    {Path::kInt8Scalar, "scalar", Family::kInt8},
    {Path::kInt8Avx2, "avx2", Family::kInt8},
    {Path::kInt8Avx512Vnni, "avx512_vnni", Family::kInt8},
    {Path::kInt8Amx, "amx", Family::kInt8},
    {Path::kWoScalar, "scalar", Family::kWeightOnly},
    {Path::kWoGemm, "gemm", Family::kWeightOnly},
    {Path::kWoGemv, "gemv", Family::kWeightOnly},
    {Path::kWoGemvVnni, "gemv_vnni", Family::kWeightOnly},
    {Path::kWoAmx, "amx", Family::kWeightOnly},
    {Path::kWoBf16, "bf16", Family::kWeightOnly},
    {Path::kWoGemmAvx2, "gemm_avx2", Family::kWeightOnly},
    {Path::kWoGemvAvx2, "gemv_avx2", Family::kWeightOnly},
    {Path::kWoGemvIntAvx2, "gemv_int_avx2", Family::kWeightOnly},
};

const char* family_name(Family family);
const PathInfo& path_info(Path path);
// Empty when this CPU can run `path` (at its best ISA), else the reason it cannot.
std::string path_unavailable(Path path);
// An op's integer `path` argument as a Path of `family`: kAuto, or a path of that family
// this CPU can run; anything else raises a ValueError listing the family's paths.
Path checked_path(int64_t id, Family family);
// The ISA an int8 path runs on.
Isa int8_path_isa(Path path);

}  // namespace lowbit::cpu
