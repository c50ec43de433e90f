// Which instruction-set path the CPU kernels take.
//
// Detected once from the CPU (cpuid through the compiler's builtins); tests and A/B
// benchmarks can force a lower path with set_isa() so that every path runs on one
// machine. Asking for a path this CPU cannot run is an error, never a silent downgrade.
#pragma once

#include <cstdint>
#include <string>

namespace lowbit::cpu {

enum class Isa {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // AVX2 + FMA: vpmaddubsw / vpmaddwd for int8
  kAvx512Vnni = 2,  // AVX-512 F/BW/VL/DQ + VNNI (vpdpbusd)
  kAmx = 3,         // the above + AMX-INT8 tiles (tdpbsud), for the int8 GEMM
};

Isa best_isa();         // the best path this CPU supports
Isa current_isa();      // the path the kernels take now
bool has_amx_bf16();    // AMX usable (best_isa() == kAmx) and the CPU has AMX-BF16
bool has_avx512_bf16();  // AVX-512 VNNI and the BF16 dot products (vdpbf16ps): Cooper Lake, Zen 4 and newer
bool has_avx_vnni();     // AVX2 and AVX-VNNI (256-bit vpdpbusd in VEX form): Alder Lake, Sapphire Rapids, Zen 5
// At least AVX-512 VNNI: the AVX-512 kernels (weight-only GEMM, quantizer) apply.
inline bool has_avx512(Isa isa) { return static_cast<int>(isa) >= static_cast<int>(Isa::kAvx512Vnni); }
const char* isa_name(Isa isa);
// Forces a path by name ("scalar", "avx2", "avx512_vnni", "amx") or "auto" (= best_isa()).
// Throws std::invalid_argument for an unknown name or a path this CPU lacks.
void set_isa(const std::string& name);

enum class PeakKind { kInt8, kFma };
// Operations per second one thread sustains (int8: 2 per multiply-add; fp32: 2 per FMA),
// measured for about `seconds` with the widest instructions of current_isa()
// (csrc/cpu/peak.cpp), and the name of those instructions.
double peak_ops_per_second(PeakKind kind, double seconds);
const char* peak_instruction(PeakKind kind);

}  // namespace lowbit::cpu
