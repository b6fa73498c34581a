// The floating-point environment the CPU kernels run in.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace decodekit {
namespace cpu {

// Runs the enclosing scope with IEEE denormals (flush-to-zero and
// denormals-are-zero cleared), whatever the calling thread set:
// torch.set_flush_denormal(True) sets them on that thread only, so without
// this a row's bits (and a top-k threshold just below 0, or a tiny parameter
// converted to float32) would depend on the thread. Restores the caller's
// mode on exit.
struct IeeeDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned saved;
  inline __attribute__((always_inline)) IeeeDenormals() : saved(_mm_getcsr()) {
    if (saved & 0x8040u) _mm_setcsr(saved & ~0x8040u);
  }
  inline __attribute__((always_inline)) ~IeeeDenormals() {
    if (saved & 0x8040u) _mm_setcsr(saved);
  }
#endif
  IeeeDenormals(const IeeeDenormals&) = delete;
  IeeeDenormals& operator=(const IeeeDenormals&) = delete;
};

}  // namespace cpu
}  // namespace decodekit
