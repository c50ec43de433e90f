// Ceiling probes for the benchmarks: the rate one core sustains on independent vpdpbusd
// (int8 multiply-adds) or vfmadd231ps (fp32) chains with register operands only.
// Twenty-four accumulator registers cover the instructions' latency on current cores.
// Written in inline assembly: the compiler otherwise keeps an accumulator array in
// memory across the timing loop, and would measure stores instead.
#include <chrono>
#include <cstdint>

#include "cpu/isa.h"

#define LOWBIT_REPEAT24(OP) \
  OP(8) OP(9) OP(10) OP(11) OP(12) OP(13) OP(14) OP(15) OP(16) OP(17) OP(18) OP(19) \
  OP(20) OP(21) OP(22) OP(23) OP(24) OP(25) OP(26) OP(27) OP(28) OP(29) OP(30) OP(31)
#define LOWBIT_VNNI(r) "vpdpbusd %%zmm0, %%zmm1, %%zmm" #r "\n\t"
#define LOWBIT_FMA(r) "vfmadd231ps %%zmm0, %%zmm1, %%zmm" #r "\n\t"
#define LOWBIT_CLOBBER(r) "zmm" #r,

namespace lowbit::cpu {
namespace {

// Runs `iterations` rounds of 24 independent instructions of the kind; all registers
// start at zero, so no denormal or overflow ever occurs.
void run(PeakKind kind, int64_t iterations) {
  if (kind == PeakKind::kVnni) {
    asm volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t"
        "1:\n\t" LOWBIT_REPEAT24(LOWBIT_VNNI) "dec %0\n\tjnz 1b\n\t"
        : "+r"(iterations)
        :
        : LOWBIT_REPEAT24(LOWBIT_CLOBBER) "zmm0", "zmm1", "cc");
  } else {
    asm volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t"
        "1:\n\t" LOWBIT_REPEAT24(LOWBIT_FMA) "dec %0\n\tjnz 1b\n\t"
        : "+r"(iterations)
        :
        : LOWBIT_REPEAT24(LOWBIT_CLOBBER) "zmm0", "zmm1", "cc");
  }
}

}  // namespace

double peak_ops_per_second(PeakKind kind, double seconds) {
  using clock = std::chrono::steady_clock;
  constexpr int64_t kRound = 1 << 16;
  const auto start = clock::now();
  int64_t rounds = 0;
  double elapsed = 0;
  do {
    run(kind, kRound);
    ++rounds;
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  } while (elapsed < seconds);
  // vpdpbusd: 64 multiply-adds per instruction; vfmadd231ps: 16; two operations each.
  const double ops = kind == PeakKind::kVnni ? 128.0 : 32.0;
  return rounds * kRound * 24 * ops / elapsed;
}

}  // namespace lowbit::cpu
