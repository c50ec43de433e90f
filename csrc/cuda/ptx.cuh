// Inline-PTX wrappers shared by the tensor-core kernels (sm_80 and newer): asynchronous
// global -> shared copies, their commit / wait groups, ldmatrix, and the acquire / release
// pair of a lock that orders blocks (serial split-K).
#pragma once

#include <cstdint>

namespace lowbit::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 writes 16 zero bytes instead.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The same copy with an L2 cache policy (createpolicy below): weights read once are marked
// evict-first and leave the L2 to the activations and outputs.
__device__ __forceinline__ void cp_async_16_hint(void* dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "l"(policy));
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ uint64_t evict_normal_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// Block-wide wait until *lock == value (thread 0 polls with acquire loads at GPU scope; the
// barrier then orders every thread's later reads after the acquire).
__device__ __forceinline__ void wait_for_turn(const int* lock, int value) {
  if (threadIdx.x == 0) {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(lock) : "memory");
    } while (seen != value);
  }
  __syncthreads();
}

// Block-wide *lock = value after every thread's earlier global writes: each thread fences
// its own writes at GPU scope, the barrier gathers them, thread 0 publishes with a release store.
__device__ __forceinline__ void pass_turn(int* lock, int value) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(lock), "r"(value) : "memory");
}

}  // namespace lowbit::cuda
