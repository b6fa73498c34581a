// Per-thread scratch of the CPU kernels.
//
// Buf<T> is a grow-only buffer defined in namespace DK_ISA rather than a
// std::vector<float> / <double>: the out-of-line members of std::vector of a
// standard type would be weak symbols of one name in every instruction-set
// build, and the linker would keep one copy (possibly the AVX-512 one) for all
// of them (the ODR hazard; scripts/check_isa_symbols.sh checks there is none).
// std::vector of a type declared in namespace DK_ISA is safe: its symbols'
// names differ per build.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#include "cpu/common/isa.h"  // DK_ISA

namespace decodekit {
namespace cpu {
namespace DK_ISA {

template <typename T>
struct Buf {
  T* p = nullptr;
  int64_t n = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  int64_t size() const { return n; }
  T* data() { return p; }
  const T* data() const { return p; }
  void release() {
    std::free(p);
    p = nullptr;
    n = 0;
  }
  void resize(int64_t need) {  // contents are not preserved
    if (need <= n) return;
    std::free(p);
    p = static_cast<T*>(std::malloc(static_cast<size_t>(need) * sizeof(T)));
    if (!p) throw std::bad_alloc();
    n = need;
  }
  T* get(int64_t need) {  // resize(need), then data()
    resize(need);
    return p;
  }
};

// Per-thread scratch is kept between calls (no allocation on the hot path)
// unless a call needed more than this many entries: then it is freed again,
// so one huge call does not pin its memory for the life of the thread.
constexpr int64_t kKeepScratch = int64_t{1} << 20;

template <typename T>
void trim(Buf<T>& b) {
  if (b.size() > kKeepScratch) b.release();
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
