// Ceiling probes for the benchmarks: the rate one core sustains on independent int8
// multiply-add or fp32 FMA chains with register operands only, using the widest
// instructions of the ISA the kernels take now (cpu/isa.h, current_isa()):
//
//   ISA                 int8 multiply-adds                         fp32
//   avx512_vnni / amx   vpdpbusd zmm (64 per instruction)          vfmadd231ps zmm (16)
//   avx2 + AVX-VNNI     {vex} vpdpbusd ymm (32)                    vfmadd231ps ymm (8)
//   avx2                vpmaddubsw + vpmaddwd + vpaddd ymm (32)    vfmadd231ps ymm (8)
//   scalar              pmaddwd + paddd xmm (8, int16 operands)    mulps + addps xmm (4)
//
// The AVX2 triple is what the AVX2 int8 kernels issue per 32 products (u8 x s8 pairs into
// int16, pairs of those into int32, the accumulate). Enough independent accumulators cover
// each instruction's latency on current cores. Written in inline assembly (a probe runs only
// where the CPU has its instructions): the compiler otherwise
// keeps an accumulator array in memory across the timing loop, and would measure stores.
#include <chrono>
#include <cstdint>

#include "cpu/isa.h"

#define LOWBIT_REPEAT24(OP) \
  OP(8) OP(9) OP(10) OP(11) OP(12) OP(13) OP(14) OP(15) OP(16) OP(17) OP(18) OP(19) \
  OP(20) OP(21) OP(22) OP(23) OP(24) OP(25) OP(26) OP(27) OP(28) OP(29) OP(30) OP(31)
#define LOWBIT_REPEAT12(OP) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11) OP(12) OP(13)
#define LOWBIT_REPEAT6(OP) OP(3, 9) OP(4, 10) OP(5, 11) OP(6, 12) OP(7, 13) OP(8, 14)
#define LOWBIT_VNNI512(r) "vpdpbusd %%zmm0, %%zmm1, %%zmm" #r "\n\t"
#define LOWBIT_FMA512(r) "vfmadd231ps %%zmm0, %%zmm1, %%zmm" #r "\n\t"
#define LOWBIT_VNNI256(r) "%{vex%} vpdpbusd %%ymm0, %%ymm1, %%ymm" #r "\n\t"
#define LOWBIT_FMA256(r) "vfmadd231ps %%ymm0, %%ymm1, %%ymm" #r "\n\t"
// t = maddubs(a, w); t = madd(t, ones); acc += t  (t: ymm3..8, acc: ymm9..14, ones: ymm2)
#define LOWBIT_MADD256(t, acc)                                                    \
  "vpmaddubsw %%ymm1, %%ymm0, %%ymm" #t "\n\tvpmaddwd %%ymm2, %%ymm" #t ", %%ymm" #t \
  "\n\tvpaddd %%ymm" #t ", %%ymm" #acc ", %%ymm" #acc "\n\t"
#define LOWBIT_MADD128(t, acc) \
  "movdqa %%xmm0, %%xmm" #t "\n\tpmaddwd %%xmm1, %%xmm" #t "\n\tpaddd %%xmm" #t ", %%xmm" #acc "\n\t"
#define LOWBIT_MULADD128(t, acc) \
  "movaps %%xmm0, %%xmm" #t "\n\tmulps %%xmm1, %%xmm" #t "\n\taddps %%xmm" #t ", %%xmm" #acc "\n\t"
#define LOWBIT_ZMM(r) "zmm" #r,
#define LOWBIT_YMM(r) "ymm" #r,
#define LOWBIT_CLOBBER_YMM \
  "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8", "ymm9", "ymm10", "ymm11", "ymm12", "ymm13", \
      "ymm14", "ymm15"
#define LOWBIT_CLOBBER_XMM \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", \
      "xmm14", "xmm15"

namespace lowbit::cpu {
namespace {

enum class Probe { kVnni512, kFma512, kVnni256, kMadd256, kFma256, kMadd128, kMulAdd128 };

struct ProbeInfo {
  const char* instruction;
  double ops_per_round;  // operations (2 per multiply-add) in one round of the loop body
};

ProbeInfo info(Probe probe) {
  switch (probe) {
    case Probe::kVnni512: return {"vpdpbusd zmm", 24 * 64 * 2};
    case Probe::kFma512: return {"vfmadd231ps zmm", 24 * 16 * 2};
    case Probe::kVnni256: return {"vpdpbusd ymm (AVX-VNNI)", 12 * 32 * 2};
    case Probe::kMadd256: return {"vpmaddubsw+vpmaddwd ymm", 12 * 32 * 2};
    case Probe::kFma256: return {"vfmadd231ps ymm", 12 * 8 * 2};
    case Probe::kMadd128: return {"pmaddwd xmm", 12 * 8 * 2};
    case Probe::kMulAdd128: return {"mulps+addps xmm", 12 * 8};
  }
  return {"", 0};
}

Probe probe_for(PeakKind kind) {
  const Isa isa = current_isa();
  if (has_avx512(isa)) return kind == PeakKind::kInt8 ? Probe::kVnni512 : Probe::kFma512;
  if (isa == Isa::kAvx2) {
    if (kind == PeakKind::kFma) return Probe::kFma256;
    return has_avx_vnni() ? Probe::kVnni256 : Probe::kMadd256;
  }
  return kind == PeakKind::kInt8 ? Probe::kMadd128 : Probe::kMulAdd128;
}

// Each runs `iterations` rounds of the probe's loop body; all registers start at zero, so
// no denormal or overflow ever occurs. The target attributes only let the asm name the
// wider registers; the compiler emits no instruction of its own with them.
__attribute__((target("avx512f"))) void run_zmm(Probe probe, int64_t iterations) {
  if (probe == Probe::kVnni512) {
    asm volatile("vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t"
                 "1:\n\t" LOWBIT_REPEAT24(LOWBIT_VNNI512) "dec %0\n\tjnz 1b\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_REPEAT24(LOWBIT_ZMM) "zmm0", "zmm1", "cc");
  } else {
    asm volatile("vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t"
                 "1:\n\t" LOWBIT_REPEAT24(LOWBIT_FMA512) "dec %0\n\tjnz 1b\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_REPEAT24(LOWBIT_ZMM) "zmm0", "zmm1", "cc");
  }
}

__attribute__((target("avx2"))) void run_ymm(Probe probe, int64_t iterations) {
  if (probe == Probe::kVnni256) {
    asm volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpxor %%ymm1, %%ymm1, %%ymm1\n\t"
                 "1:\n\t" LOWBIT_REPEAT12(LOWBIT_VNNI256) "dec %0\n\tjnz 1b\n\tvzeroupper\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_CLOBBER_YMM, "cc");
  } else if (probe == Probe::kFma256) {
    asm volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpxor %%ymm1, %%ymm1, %%ymm1\n\t"
                 "1:\n\t" LOWBIT_REPEAT12(LOWBIT_FMA256) "dec %0\n\tjnz 1b\n\tvzeroupper\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_CLOBBER_YMM, "cc");
  } else {
    asm volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpxor %%ymm1, %%ymm1, %%ymm1\n\tvpxor %%ymm2, %%ymm2, %%ymm2\n\t"
                 "1:\n\t" LOWBIT_REPEAT6(LOWBIT_MADD256) LOWBIT_REPEAT6(LOWBIT_MADD256) "dec %0\n\tjnz 1b\n\t"
                 "vzeroupper\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_CLOBBER_YMM, "cc");
  }
}

void run_xmm(Probe probe, int64_t iterations) {
  if (probe == Probe::kMadd128) {
    asm volatile("pxor %%xmm0, %%xmm0\n\tpxor %%xmm1, %%xmm1\n\t"
                 "1:\n\t" LOWBIT_REPEAT6(LOWBIT_MADD128) LOWBIT_REPEAT6(LOWBIT_MADD128) "dec %0\n\tjnz 1b\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_CLOBBER_XMM, "cc");
  } else {
    asm volatile("xorps %%xmm0, %%xmm0\n\txorps %%xmm1, %%xmm1\n\t"
                 "1:\n\t" LOWBIT_REPEAT6(LOWBIT_MULADD128) LOWBIT_REPEAT6(LOWBIT_MULADD128) "dec %0\n\tjnz 1b\n\t"
                 : "+r"(iterations)
                 :
                 : LOWBIT_CLOBBER_XMM, "cc");
  }
}

void run(Probe probe, int64_t iterations) {
  switch (probe) {
    case Probe::kVnni512:
    case Probe::kFma512: return run_zmm(probe, iterations);
    case Probe::kVnni256:
    case Probe::kFma256:
    case Probe::kMadd256: return run_ymm(probe, iterations);
    case Probe::kMadd128:
    case Probe::kMulAdd128: return run_xmm(probe, iterations);
  }
}

}  // namespace

const char* peak_instruction(PeakKind kind) { return info(probe_for(kind)).instruction; }

double peak_ops_per_second(PeakKind kind, double seconds) {
  using clock = std::chrono::steady_clock;
  constexpr int64_t kRound = 1 << 16;
  const Probe probe = probe_for(kind);
  const auto start = clock::now();
  int64_t rounds = 0;
  double elapsed = 0;
  do {
    run(probe, kRound);
    ++rounds;
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  } while (elapsed < seconds);
  return rounds * kRound * info(probe).ops_per_round / elapsed;
}

}  // namespace lowbit::cpu
