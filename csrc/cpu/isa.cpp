#include "cpu/isa.h"

#include <atomic>
#include <stdexcept>

namespace lowbit::cpu {
namespace {

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

std::atomic<int>& forced() {
  static std::atomic<int> value{static_cast<int>(best_isa())};
  return value;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa current_isa() { return static_cast<Isa>(forced().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512_vnni";
  }
  return "unknown";
}

void set_isa(const std::string& name) {
  Isa wanted;
  if (name == "auto") wanted = best_isa();
  else if (name == "scalar") wanted = Isa::kScalar;
  else if (name == "avx2") wanted = Isa::kAvx2;
  else if (name == "avx512_vnni") wanted = Isa::kAvx512Vnni;
  else throw std::invalid_argument("unknown CPU path '" + name + "'; expected auto, scalar, avx2 or avx512_vnni");
  if (static_cast<int>(wanted) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(wanted) +
                                " path (best available: " + isa_name(best_isa()) + ")");
  forced().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

}  // namespace lowbit::cpu
