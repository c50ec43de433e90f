#include "cpu/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <stdexcept>

namespace lowbit::cpu {
namespace {

// AMX needs the CPU feature (cpuid leaf 7: AMX-TILE, AMX-INT8) and the kernel's permission
// to use the tile state, which Linux grants per process on request (arch_prctl).
bool amx_bf16_feature() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 22));
}

bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
  if (!tile || !int8) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return amx_usable() ? Isa::kAmx : Isa::kAvx512Vnni;
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

bool has_amx_bf16() {
  static const bool ok = best_isa() == Isa::kAmx && amx_bf16_feature();
  return ok;
}

bool has_avx512_bf16() {
  static const bool ok = has_avx512(best_isa()) && __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool has_avx_vnni() {
  static const bool ok = [] {
    unsigned eax, ebx, ecx, edx;
    return static_cast<int>(best_isa()) >= static_cast<int>(Isa::kAvx2) &&
           __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 4));
  }();
  return ok;
}

Isa current_isa() { return static_cast<Isa>(forced().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAmx: return "amx";
  }
  return "unknown";
}

void set_isa(const std::string& name) {
  Isa wanted;
  if (name == "auto") wanted = best_isa();
  else if (name == "scalar") wanted = Isa::kScalar;
  else if (name == "avx2") wanted = Isa::kAvx2;
  else if (name == "avx512_vnni") wanted = Isa::kAvx512Vnni;
  else if (name == "amx") wanted = Isa::kAmx;
  else throw std::invalid_argument("unknown CPU path '" + name + "'; expected auto, scalar, avx2, avx512_vnni or amx");
  if (static_cast<int>(wanted) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(wanted) +
                                " path (best available: " + isa_name(best_isa()) + ")");
  forced().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

}  // namespace lowbit::cpu
