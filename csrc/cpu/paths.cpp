#include "cpu/paths.h"

#include <c10/util/Exception.h>

#include <sstream>

namespace lowbit::cpu {

const char* family_name(Family family) { return family == Family::kInt8 ? "int8" : "weight_only"; }

const PathInfo& path_info(Path path) {
  for (const PathInfo& info : kPaths)
    if (info.path == path) return info;
  TORCH_CHECK(false, "lowbit: no kernel path with id ", static_cast<int64_t>(path));
}

Isa int8_path_isa(Path path) {
  switch (path) {
    case Path::kInt8Avx2: return Isa::kAvx2;
    case Path::kInt8Avx512Vnni: return Isa::kAvx512Vnni;
    case Path::kInt8Amx: return Isa::kAmx;
    default: return Isa::kScalar;
  }
}

namespace {

// The ISA a path needs at least, and whether it needs the AMX-BF16 extension.
Isa needed_isa(Path path) {
  switch (path) {
    case Path::kInt8Scalar:
    case Path::kInt8Avx2:
    case Path::kInt8Avx512Vnni:
    case Path::kInt8Amx: return int8_path_isa(path);
    case Path::kWoGemm:
    case Path::kWoGemv:
    case Path::kWoGemvVnni:
    case Path::kWoBf16: return Isa::kAvx512Vnni;
    case Path::kWoAmx: return Isa::kAmx;
    case Path::kWoGemmAvx2:
    case Path::kWoGemvAvx2:
    case Path::kWoGemvIntAvx2: return Isa::kAvx2;
    default: return Isa::kScalar;
  }
}

}  // namespace

std::string path_unavailable(Path path) {
  const Isa need = needed_isa(path);
  if (static_cast<int>(need) > static_cast<int>(best_isa()))
    return std::string("needs ") + isa_name(need) + "; this CPU's best is " + isa_name(best_isa());
  if (path == Path::kWoAmx && !has_amx_bf16()) return "needs AMX-BF16, which this CPU lacks";
  if (path == Path::kWoBf16 && !has_avx512_bf16()) return "needs AVX512-BF16, which this CPU lacks";
  return "";
}

Path checked_path(int64_t id, Family family) {
  if (id == static_cast<int64_t>(Path::kAuto)) return Path::kAuto;
  std::ostringstream valid;
  valid << "-1 = auto";
  for (const PathInfo& info : kPaths) {
    if (info.family != family) continue;
    valid << ", " << static_cast<int64_t>(info.path) << " = " << info.name;
    if (static_cast<int64_t>(info.path) != id) continue;
    const std::string why = path_unavailable(info.path);
    TORCH_CHECK_VALUE(why.empty(), "path ", id, " (", info.name, "): this CPU cannot run it: ", why);
    return info.path;
  }
  TORCH_CHECK_VALUE(false, "path ", id, " is not a ", family_name(family), " kernel path; valid: ", valid.str());
}

}  // namespace lowbit::cpu
