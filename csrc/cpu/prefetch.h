// Software prefetch for kernels that stream their weights from DRAM once (small-M GEMVs).
//
// A core that reads one sequential stream gets less DRAM bandwidth than one that reads
// several at once (the hardware prefetchers stop at 4 KiB pages, so one stream keeps few
// lines in flight). On a 2-core Sapphire Rapids VM (2 threads, 512 MiB read once;
// bench/dram_streams.c, two runs) one stream per thread reads 26.9-27.6 GB/s, two
// 29.2-29.3, four 30.6-30.7. prefetch_streams gives a kernel that reads one stream the
// same concurrency: while it consumes a window of kStreams * kStreamBytes bytes, it
// prefetches the next window into L2 as kStreams streams, each kStreamBytes long and
// advancing at 1 / kStreams of the consumption rate, so that the window is in L2 when the
// kernel reaches it (29.7-30.0 GB/s in the same measurement). Windows are aligned to
// absolute addresses, so consecutive panels of one thread chain up without the kernel
// knowing its range; past the range's end a thread prefetches at most one window it does
// not need. With the weights in L3 the prefetches are work for nothing: up to 15% slower
// at 2-4 rows there (bench/RESULTS.md), where a decoder's weights never are.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lowbit::cpu {

constexpr int kStreams = 4;
constexpr std::uintptr_t kStreamBytes = 16384;

// Call once per 64 * kStreams bytes consumed, with a pointer into them: each stream then
// moves on one cache line per call. Static: kernel files of different ISA flags include it,
// and each must keep its own copy (one shared inline copy could carry another's ISA).
static inline void prefetch_streams(const void* at) {
  constexpr std::uintptr_t window = kStreams * kStreamBytes;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(at);
  // Addresses as integers: the window may lie past the end of the weights (prefetching
  // there is harmless), where pointer arithmetic would not be defined.
  const std::uintptr_t next = (a / window + 1) * window + (a % window) / kStreams;
#pragma GCC unroll 4
  for (int s = 0; s < kStreams; ++s)
    _mm_prefetch(reinterpret_cast<const char*>(next + s * kStreamBytes), _MM_HINT_T1);
}

}  // namespace lowbit::cpu
