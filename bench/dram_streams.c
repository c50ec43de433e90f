// DRAM read bandwidth of one buffer read once per pass by every thread, each thread its
// contiguous share, three ways: one sequential stream per thread, S interleaved streams
// per thread, and one stream with the window prefetch of csrc/cpu/prefetch.h (the next
// 4 x 16 KiB window into L2 as four streams). The measurement behind prefetch.h.
//
//   gcc -O2 -march=native -fopenmp bench/dram_streams.c -o /tmp/dram_streams
//   OMP_NUM_THREADS=2 /tmp/dram_streams [MiB=512] [passes=12]
//
// Prints the best and mean GB/s over the passes after two warm-up passes. The buffer must
// be well past the last-level cache for the figures to be DRAM's.
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { kStreams = 4, kStreamBytes = 16384, kStep = 256 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static inline __m512i add4(__m512i acc, const char* q) {
  acc = _mm512_add_epi32(acc, _mm512_loadu_si512(q));
  acc = _mm512_add_epi32(acc, _mm512_loadu_si512(q + 64));
  acc = _mm512_add_epi32(acc, _mm512_loadu_si512(q + 128));
  return _mm512_add_epi32(acc, _mm512_loadu_si512(q + 192));
}

// `streams` interleaved sequential streams over [p, p + n).
static __m512i read_streams(const char* p, size_t n, int streams) {
  __m512i acc = _mm512_setzero_si512();
  const size_t per = n / streams / kStep * kStep;
  for (size_t i = 0; i < per; i += kStep)
    for (int s = 0; s < streams; ++s) acc = add4(acc, p + s * per + i);
  return acc;
}

// One stream, prefetching the next window as prefetch.h does.
static __m512i read_window_prefetch(const char* p, size_t n) {
  const uintptr_t window = (uintptr_t)kStreams * kStreamBytes;
  __m512i acc = _mm512_setzero_si512();
  for (size_t i = 0; i + kStep <= n; i += kStep) {
    const uintptr_t a = (uintptr_t)(p + i);
    const char* next = (const char*)((a / window + 1) * window + (a % window) / kStreams);
    for (int s = 0; s < kStreams; ++s) _mm_prefetch(next + s * kStreamBytes, _MM_HINT_T1);
    acc = add4(acc, p + i);
  }
  return acc;
}

static void measure(const char* label, const char* buf, size_t bytes, int passes, int mode) {
  int sink = 0;
  double best = 1e30, sum = 0;
  for (int r = 0; r < passes + 2; ++r) {
    const double t0 = now();
#pragma omp parallel reduction(+ : sink)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t share = bytes / nt / kStep * kStep;
      const char* p = buf + t * share;
      const __m512i acc = mode > 0 ? read_streams(p, share, mode) : read_window_prefetch(p, share);
      sink += _mm512_reduce_add_epi32(acc);
    }
    const double dt = now() - t0;
    if (r >= 2) {
      sum += dt;
      if (dt < best) best = dt;
    }
  }
  // The checksum is printed so that the compiler keeps the reads.
  printf("%-28s best %5.1f GB/s  mean %5.1f GB/s  (checksum %d)\n", label, bytes / best / 1e9,
         bytes / (sum / passes) / 1e9, sink);
}

int main(int argc, char** argv) {
  const size_t bytes = (size_t)(argc > 1 ? atol(argv[1]) : 512) << 20;
  const int passes = argc > 2 ? atoi(argv[2]) : 12;
  char* buf = aligned_alloc(4096, bytes);
  if (!buf) return 1;
  memset(buf, 1, bytes);
  printf("%zu MiB, %d threads\n", bytes >> 20, omp_get_max_threads());
  measure("1 stream per thread", buf, bytes, passes, 1);
  measure("2 streams per thread", buf, bytes, passes, 2);
  measure("4 streams per thread", buf, bytes, passes, 4);
  measure("1 stream + window prefetch", buf, bytes, passes, 0);
  free(buf);
  return 0;
}
