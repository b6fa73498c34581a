// Philox4x32-10 counter-based random number generator.
//
// Source: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random
// numbers: as easy as 1, 2, 3", SC'11. Round constants and the 10-round schedule
// are those of the paper (the Random123 reference values).
//
// Framework-free and header-only: the same code runs in the CPU kernels and in
// CUDA device code. Keying follows DESIGN.md:
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (offset low, offset high, stream, block)
//   element i of a stream uses block i / 4 and output lane i % 4.
#pragma once

#include <cstdint>

// DK_HOST_DEVICE marks the member functions of the shared headers and DK_FN
// their namespace-scope functions: device and host code under nvcc. On the
// host the CPU kernels are compiled once per instruction set (-march differs),
// so a function defined in a header and emitted out of line would be a weak
// symbol of one name in every build, and the linker would keep one copy
// (possibly the AVX-512 one) for all of them (the ODR hazard). Host functions
// are therefore always inlined, and namespace-scope ones also get internal
// linkage; scripts/check_isa_symbols.py checks the objects.
#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#define DK_FN __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline __attribute__((always_inline))
#define DK_FN static inline __attribute__((always_inline))
#endif

namespace decodekit {

struct Philox4x32 {
  uint32_t v[4];
};

DK_FN void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// One Philox4x32-10 block: 10 rounds over counter c with key k.
DK_FN Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Stream numbers (DESIGN.md). New purposes get new numbers; never reuse one.
enum PhiloxStream : uint32_t {
  kStreamSample = 0,        // drawing the sampled token
  kStreamSpecAccept = 1,    // speculative acceptance uniforms
  kStreamSpecResidual = 2,  // 2 + j: residual draw at draft position j; 2 + K: bonus
  // 2^16 + n: tree node n (flat index, root 0): uniform 0 (elements 0-1) decides whether node n
  // is accepted, uniform 1 (elements 2-3) is the residual draw after n's children are all rejected.
  kStreamTreeNode = 1u << 16,
  kStreamTreeBonus = 1u << 17  // the bonus draw after an accepted leaf of a tree
};

// The random stream of one request: all numbers depend only on (seed, offset, stream, i).
struct PhiloxStreamRef {
  uint64_t seed;
  uint64_t offset;
  uint32_t stream;

  // Element i of the stream (32 random bits).
  DK_HOST_DEVICE uint32_t element(uint64_t i) const {
    const Philox4x32 r =
        philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), stream,
                      static_cast<uint32_t>(i >> 2), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    return r.v[i & 3];
  }

  // float32 uniform in [0, 1) from element i: (x >> 8) * 2^-24.
  DK_HOST_DEVICE float uniform_float(uint64_t i) const {
    return static_cast<float>(element(i) >> 8) * 5.9604644775390625e-08f;
  }

  // float64 uniform in [0, 1) number i, built from elements 2i and 2i + 1:
  // ((a >> 5) * 2^26 + (b >> 6)) * 2^-53.
  DK_HOST_DEVICE double uniform_double(uint64_t i) const {
    // Elements 2i and 2i+1 always share one Philox block (lanes 0,1 or 2,3).
    const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), stream,
                                       static_cast<uint32_t>((2 * i) >> 2), static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32));
    const uint32_t a = r.v[(2 * i) & 3];
    const uint32_t b = r.v[(2 * i + 1) & 3];
    const uint64_t bits = (static_cast<uint64_t>(a >> 5) << 26) + static_cast<uint64_t>(b >> 6);
    return static_cast<double>(bits) * 1.1102230246251565e-16;  // 2^-53
  }
};

}  // namespace decodekit
