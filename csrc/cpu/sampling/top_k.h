// Top-k of the sampling kernels: the exact top-k candidates of a row, gathered
// from the chunks whose maximum can hold one (pass A records the maxima).
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/sampling/internal.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace detail {

// Keeps the k best (x, idx) seen so far in scan (ascending index) order. Once
// full, a later element equal to the threshold ranks below every kept element
// with that value (its index is higher), so admission is strictly x > thr.
//
// Pass A only records each chunk's maximum (chunk_max); gather_chunks then
// visits the chunks that can hold a top-k element. The k-th largest chunk
// maximum is a lower bound of the k-th largest value (those k maxima are k
// distinct elements), so a chunk whose maximum is below it holds no top-k
// element: for k = 50 of 128k tokens about 50 of 501 chunks are read again
// (from cache), instead of testing and branching on every vector of the row.
struct TopKGather {
  int64_t k = 0;
  int64_t cap = 0;
  std::vector<Cand>* buf = nullptr;
  Buf<float>* chunk_max = nullptr;
  Buf<float>* chunk_tmp = nullptr;
  int64_t n = 0;
  float thr = -kInf;

  void init(int64_t k_, std::vector<Cand>* b, Buf<float>* cmax = nullptr, Buf<float>* ctmp = nullptr) {
    k = k_;
    cap = k_ + std::max<int64_t>(k_, 64);
    buf = b;
    chunk_max = cmax;
    chunk_tmp = ctmp;
    if (static_cast<int64_t>(buf->size()) < cap) buf->resize(cap);
    n = 0;
    thr = -kInf;
  }
  // Where pass A writes the maxima of the ceil(V / kChunk) chunks.
  float* chunk_max_for(int64_t V) {
    chunk_max->resize((V + kChunk - 1) / kChunk);
    return chunk_max->data();
  }
  void compact() {
    Cand* d = buf->data();
    std::nth_element(d, d + (k - 1), d + n, rank_before);
    n = k;
    thr = d[k - 1].x;
  }
  void push(float x, int64_t i) {
    (*buf)[n++] = Cand{x, 0.0f, static_cast<int32_t>(i)};
    if (n == cap) compact();
  }
  // Gathers the top-k candidates of the float32 row x, whose chunk maxima
  // pass A stored (elements at -inf are never candidates).
  void gather_chunks(const float* x, int64_t V) {
    const int64_t nch = (V + kChunk - 1) / kChunk;
    const float* cm = chunk_max->data();
    float lower = -kInf;  // <= the k-th largest value
    if (k <= nch) {
      chunk_tmp->resize(nch);
      float* t = chunk_tmp->data();
      std::memcpy(t, cm, static_cast<size_t>(nch) * sizeof(float));
      std::nth_element(t, t + (k - 1), t + nch, [](float a, float b) { return a > b; });
      lower = t[k - 1];
    }
    // Admit x >= lower (compared as such, not as x > the float below it: that
    // float can be a denormal, which flush-to-zero would turn into 0) and, as
    // always, x > thr (-inf until the buffer first fills).
    thr = -kInf;
    const VF vlower = splat(lower);
    for (int64_t ch = 0; ch < nch; ++ch) {
      if (!(cm[ch] >= lower && cm[ch] > thr)) continue;
      const int64_t end = std::min(V, (ch + 1) * kChunk);
      for (int64_t c = ch * kChunk; c < end; c += kLanes) {
        const VF xs = c + kLanes <= end ? load_f32(x + c) : load_tail(x, c, end);
        uint32_t bits = lane_bits((xs >= vlower) & (xs > splat(thr)));
        while (bits) {  // lanes admitted against the threshold at the vector's start
          const int j = __builtin_ctz(bits);
          bits &= bits - 1;
          push(x[c + j], c + j);
        }
      }
    }
  }
  void finish() {
    if (n > k) compact();
  }
};

}  // namespace detail
}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
