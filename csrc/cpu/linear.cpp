// Batch-invariant linear layer (see linear.h). Compiled once per instruction
// set; every build gives the same bits (same lane-wise FMAs, same tree).
//
// The stock CPU GEMM changes its blocking of the inner dimension with M, so a
// row's result depends on how many rows share the call; here the reduction of
// each output element is the same sequence of operations for every M. Tiling:
// 4 weight rows x 4 input rows at a time (16 accumulators of 16 lanes), so
// each weight vector loaded from memory is used by 4 input rows, and each
// input vector by 4 weight rows.
#include "linear.h"
#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"

#include <algorithm>
#include <cstring>

#include "cpu/common/scratch.h"
#include "cpu/common/vec.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {
namespace {

constexpr int kL = kVecLanes;
constexpr int kTileN = 4;
constexpr int kTileM = 4;
constexpr int64_t kPrefetchTiles = 3;  // tiles ahead (see tile())

// The tail of K (K mod 16 elements) is zero-padded into full vectors, so the
// operation sequence is the same for every row.
DK_VINLINE VF load_k_tail(const float* p, int64_t n) {
  float t[kL] = {0};
  std::memcpy(t, p, static_cast<size_t>(n) * sizeof(float));
  return load_f32(t);
}

template <int TM, int TN>
void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, const float* bias, float* y,
          int64_t ldy) {
  VF acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = splat(0.0f);
  const int64_t K16 = K - K % kL;
  for (int64_t k = 0; k < K16; k += kL) {
    VF wv[TN];
    // Software prefetch a few cache lines ahead in each weight row: the hardware prefetcher
    // falls behind on the TN interleaved row streams (with one input row too).
    // The tile kPrefetchTiles tiles ahead, read as one stream (rows contiguous, ldw == K).
    for (int j = 0; j < TN; ++j) __builtin_prefetch(w + kPrefetchTiles * TN * ldw + k * TN + j * kL, 0, 3);
    for (int j = 0; j < TN; ++j) wv[j] = load_f32(w + j * ldw + k);
    for (int i = 0; i < TM; ++i) {
      const VF xv = load_f32(x + i * ldx + k);
      for (int j = 0; j < TN; ++j) acc[i][j] = fma16(xv, wv[j], acc[i][j]);
    }
  }
  if (K16 < K) {
    VF wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = load_k_tail(w + j * ldw + K16, K - K16);
    for (int i = 0; i < TM; ++i) {
      const VF xv = load_k_tail(x + i * ldx + K16, K - K16);
      for (int j = 0; j < TN; ++j) acc[i][j] = fma16(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) y[i * ldy + j] = tree_sum16(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

// Rows [0, M) against weight rows [n0, n0 + tn), tn <= kTileN.
template <int TN>
void column_block(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                  float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kTileM <= M; m += kTileM) tile<kTileM, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
  // The last 1-3 rows in one tile, so the weight rows are read once for them too (the
  // operations per output element are the same whatever the tile height).
  switch (M - m) {
    case 3:
      tile<3, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
      break;
    case 2:
      tile<2, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
      break;
    case 1:
      tile<1, TN>(x + m * ldx, ldx, w, ldw, K, bias, y + m * ldy, ldy);
      break;
    default:
      break;
  }
}

// ------------------------------------------------------ quantized weights ----
// Blocks of 32 weights (linear.h). A block is dequantized into two VF (weights
// 0-15 and 16-31 of the block, i.e. two consecutive k-vectors of the float32
// kernel above), then used exactly as the float32 kernel uses its loaded weight
// vectors: same FMAs in the same order, so the same bits. The binary16 scales
// are converted by F16C in the AVX-512 / AVX2 builds (exact), in software in the
// baseline build (exact too).

#ifndef DK_QTN
#define DK_QTN 4
#endif
constexpr int kQuantTileN = DK_QTN;  // weight rows per tile at M <= kQuantGroupedMaxM

// How many tiles ahead quant_tile prefetches its weights (measured on the 2-core EPYC:
// 2 to 8 give the same speed, 0 is 1.5-5x slower on weights that are not in the cache).
constexpr int64_t kQuantPrefetchTiles = 3;
// Up to this many rows of x, quantized tiles are dequantized in registers for each group of 4
// rows; above it, once into a float32 buffer for the float32 kernel (measured crossover).
#ifndef DK_QGROUPED_MAX_M
#define DK_QGROUPED_MAX_M 16
#endif
constexpr int64_t kQuantGroupedMaxM = DK_QGROUPED_MAX_M;

template <BlockType BT>
constexpr int64_t kBlockBytes = BT == BlockType::kQ4_1 ? kQ4_1BlockBytes : kQ8_0BlockBytes;

#if defined(__AVX512F__)
// Q4_1: the 16 possible weights of the block, fma(d, i, m) for i = 0..15, in one
// register; each nibble then picks its weight with a lane permute (vpermps reads
// the low 4 bits of each 32-bit index, so the low nibble needs no mask). d and m
// are converted together: the (d, m) pair is broadcast as one 32-bit word and
// converted, giving d, m, d, m, ... in the lanes.
DK_VINLINE void dequant_q4_1(const uint8_t* b, VF& w0, VF& w1) {
  uint32_t dm_bits;
  std::memcpy(&dm_bits, b, sizeof dm_bits);
  const __m512 dm = _mm512_cvtph_ps(_mm256_set1_epi32(static_cast<int>(dm_bits)));
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 table = _mm512_fmadd_ps(_mm512_permute_ps(dm, 0x00), iota, _mm512_permute_ps(dm, 0x55));
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
  w0.p[0] = (nf)_mm512_permutexvar_ps(q, table);
  w1.p[0] = (nf)_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

DK_VINLINE void dequant_q8_0(const uint8_t* b, VF& w0, VF& w1) {
  uint16_t d_bits;
  std::memcpy(&d_bits, b, sizeof d_bits);
  const __m512 d = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(d_bits)));
  const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
  const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
  w0.p[0] = (nf)_mm512_mul_ps(d, _mm512_cvtepi32_ps(q0));  // exact
  w1.p[0] = (nf)_mm512_mul_ps(d, _mm512_cvtepi32_ps(q1));
}
#else
typedef uint8_t nb_u __attribute__((vector_size(DK_NATIVE_LANES), aligned(1), may_alias));
typedef int8_t nsb_u __attribute__((vector_size(DK_NATIVE_LANES), aligned(1), may_alias));

DK_VINLINE float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_bits_to_float(h);
#endif
}

// d * q is exact, so d * q + m (two IEEE operations) is the one rounding of fma(d, q, m).
DK_VINLINE void dequant_q4_1(const uint8_t* b, VF& w0, VF& w1) {
  const nf d = nf{} + half_at(b);
  const nf m = nf{} + half_at(b + 2);
  for (int i = 0; i < kParts; ++i) {
    const ni q = __builtin_convertvector(*reinterpret_cast<const nb_u*>(b + 4 + i * DK_NATIVE_LANES), ni);
    w0.p[i] = d * __builtin_convertvector(q & 15, nf) + m;
    w1.p[i] = d * __builtin_convertvector(q >> 4, nf) + m;
  }
}

DK_VINLINE void dequant_q8_0(const uint8_t* b, VF& w0, VF& w1) {
  const nf d = nf{} + half_at(b);
  for (int i = 0; i < kParts; ++i) {
    const ni q0 = __builtin_convertvector(*reinterpret_cast<const nsb_u*>(b + 2 + i * DK_NATIVE_LANES), ni);
    const ni q1 = __builtin_convertvector(*reinterpret_cast<const nsb_u*>(b + 18 + i * DK_NATIVE_LANES), ni);
    w0.p[i] = d * __builtin_convertvector(q0, nf);
    w1.p[i] = d * __builtin_convertvector(q1, nf);
  }
}
#endif

template <BlockType BT>
DK_VINLINE void dequant(const uint8_t* b, VF& w0, VF& w1) {
  if (BT == BlockType::kQ4_1)
    dequant_q4_1(b, w0, w1);
  else
    dequant_q8_0(b, w0, w1);
}

// TM (<= 4) rows of x against TN weight rows given as blocks (row stride
// row_bytes), each block dequantized once in registers for the TM rows.
template <BlockType BT, int TM, int TN>
void quant_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t row_bytes, int64_t K, const float* bias,
                float* y, int64_t ldy, bool stream) {
  VF acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = splat(0.0f);
  const int64_t nb = K / kQuantBlockSize;
  // The TN rows of this tile are contiguous (TN * row_bytes bytes, read as TN interleaved
  // streams); the hardware prefetcher does not keep up with that pattern (a 30 MB Q8_0 head
  // read at 6 GB/s of the 35 a core can stream). So each block step prefetches the same
  // share of the tile kQuantPrefetchTiles tiles ahead, as one sequential stream.
  const char* ahead = reinterpret_cast<const char*>(w) + kQuantPrefetchTiles * TN * row_bytes;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const char* pf = ahead + blk * (TN * kBlockBytes<BT>);
    if (stream) {  // weight_stream::on(): non-temporal, so the stream does not evict the rest of L3
      for (int64_t q = 0; q < (TN * kBlockBytes<BT> + 63) / 64 + 1; ++q) __builtin_prefetch(pf + 64 * q, 0, 0);
    } else {
      for (int64_t q = 0; q < (TN * kBlockBytes<BT> + 63) / 64 + 1; ++q) __builtin_prefetch(pf + 64 * q, 0, 3);
    }
    VF w0[TN], w1[TN];
    for (int j = 0; j < TN; ++j) dequant<BT>(w + j * row_bytes + blk * kBlockBytes<BT>, w0[j], w1[j]);
    const int64_t k = blk * kQuantBlockSize;
    for (int i = 0; i < TM; ++i) {
      const VF x0 = load_f32(x + i * ldx + k);
      const VF x1 = load_f32(x + i * ldx + k + kL);
      for (int j = 0; j < TN; ++j) {
        acc[i][j] = fma16(x0, w0[j], acc[i][j]);
        acc[i][j] = fma16(x1, w1[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) y[i * ldy + j] = tree_sum16(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

// Rows tn (<= TN) of weights, x with M <= kTileM rows: one quant_tile.
template <BlockType BT, int TN>
void quant_small_m(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t row_bytes,
                   const float* bias, float* y, int64_t ldy, bool stream) {
  switch (M) {
    case 4:
      quant_tile<BT, 4, TN>(x, ldx, w, row_bytes, K, bias, y, ldy, stream);
      break;
    case 3:
      quant_tile<BT, 3, TN>(x, ldx, w, row_bytes, K, bias, y, ldy, stream);
      break;
    case 2:
      quant_tile<BT, 2, TN>(x, ldx, w, row_bytes, K, bias, y, ldy, stream);
      break;
    default:
      quant_tile<BT, 1, TN>(x, ldx, w, row_bytes, K, bias, y, ldy, stream);
      break;
  }
}

template <int TN>
DK_VINLINE void float_block(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, const float* bias,
                            float* y, int64_t ldy) {
  column_block<TN>(x, M, K, ldx, w, K, bias, y, ldy);
}

template <BlockType BT>
void linear_quantized_t(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* blocks, int64_t N,
                        const float* bias, float* y, int64_t ldy, int num_threads) {
  const int64_t row_bytes = K / kQuantBlockSize * kBlockBytes<BT>;
  if (M <= kQuantGroupedMaxM) {
    // Decoding, batched decoding, speculative verification: each tile of TN weight rows is
    // dequantized in registers for every group of up to kTileM rows of x (one group when
    // decoding one sequence; the tile's blocks stay in L1 between the groups). Dequantizing
    // again per group costs less than storing a float32 tile and loading it back, up to
    // about kQuantGroupedMaxM rows.
    constexpr int TN = kQuantTileN;
    const int64_t tiles = (N + TN - 1) / TN;
    const bool stream = weight_stream::on();
    parallel_rows(tiles, threads_for(tiles, num_threads), Schedule::kStatic, [&](int64_t t) {
      const int64_t n0 = t * TN;
      const int64_t tn = std::min<int64_t>(TN, N - n0);
      const uint8_t* w = blocks + n0 * row_bytes;
      const float* b = bias ? bias + n0 : nullptr;
      for (int64_t m = 0; m < M; m += kTileM) {
        const int64_t mm = std::min<int64_t>(kTileM, M - m);
        const float* xm = x + m * ldx;
        float* ym = y + m * ldy + n0;
        switch (tn) {
#if DK_QTN == 8
          case 8:
            quant_small_m<BT, 8>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
          case 7:
            quant_small_m<BT, 7>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
          case 6:
            quant_small_m<BT, 6>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
          case 5:
            quant_small_m<BT, 5>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
#endif
          case 4:
            quant_small_m<BT, 4>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
          case 3:
            quant_small_m<BT, 3>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
          case 2:
            quant_small_m<BT, 2>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
          default:
            quant_small_m<BT, 1>(xm, mm, K, ldx, w, row_bytes, b, ym, ldy, stream);
            break;
        }
      }
    });
    return;
  }
  // Prefill: each tile of kTileN weight rows is dequantized once into a per-thread float32
  // buffer [kTileN, K], then the float32 kernel runs every row of x on it.
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  parallel_rows(tiles, threads_for(tiles, num_threads), Schedule::kStatic, [&](int64_t t) {
    static thread_local Buf<float> buf;
    buf.resize(kTileN * K);
    float* wf = buf.data();
    const int64_t n0 = t * kTileN;
    const int64_t tn = std::min<int64_t>(kTileN, N - n0);
    for (int64_t j = 0; j < tn; ++j) {
      const uint8_t* row = blocks + (n0 + j) * row_bytes;
      for (int64_t blk = 0; blk < K / kQuantBlockSize; ++blk) {
        VF w0, w1;
        dequant<BT>(row + blk * kBlockBytes<BT>, w0, w1);
        store_f32(wf + j * K + blk * kQuantBlockSize, w0);
        store_f32(wf + j * K + blk * kQuantBlockSize + kL, w1);
      }
    }
    const float* b = bias ? bias + n0 : nullptr;
    switch (tn) {
      case 4:
        float_block<4>(x, M, K, ldx, wf, b, y + n0, ldy);
        break;
      case 3:
        float_block<3>(x, M, K, ldx, wf, b, y + n0, ldy);
        break;
      case 2:
        float_block<2>(x, M, K, ldx, wf, b, y + n0, ldy);
        break;
      default:
        float_block<1>(x, M, K, ldx, wf, b, y + n0, ldy);
        break;
    }
  });
}

}  // namespace

void linear(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, int64_t ldw,
            const float* bias, float* y, int64_t ldy, int num_threads) {
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  const int nt = threads_for(tiles, num_threads);
  parallel_rows(tiles, nt, Schedule::kStatic, [&](int64_t t) {
    const int64_t n0 = t * kTileN;
    const int64_t tn = std::min<int64_t>(kTileN, N - n0);
    const float* b = bias ? bias + n0 : nullptr;
    switch (tn) {
      case 4:
        column_block<4>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
      case 3:
        column_block<3>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
      case 2:
        column_block<2>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
      default:
        column_block<1>(x, M, K, ldx, w + n0 * ldw, ldw, b, y + n0, ldy);
        break;
    }
  });
}

void linear_quantized(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* blocks, BlockType type,
                      int64_t N, const float* bias, float* y, int64_t ldy, int num_threads) {
  if (type == BlockType::kQ4_1)
    linear_quantized_t<BlockType::kQ4_1>(x, M, K, ldx, blocks, N, bias, y, ldy, num_threads);
  else
    linear_quantized_t<BlockType::kQ8_0>(x, M, K, ldx, blocks, N, bias, y, ldy, num_threads);
}

namespace {
template <BlockType BT>
void dequantize_rows_t(const uint8_t* blocks, int64_t N, int64_t K, const int64_t* rows, int64_t R, float* out,
                       int num_threads) {
  const int64_t nb = K / kQuantBlockSize, row_bytes = nb * kBlockBytes<BT>;
  const int nt = threads_for(R, num_threads, R * K, int64_t{1} << 15);
  parallel_rows(R, nt, Schedule::kStatic, [&](int64_t r) {
    float* o = out + r * K;
    if (rows[r] < 0 || rows[r] >= N) {  // never read outside the weight
      std::memset(o, 0, static_cast<size_t>(K) * sizeof(float));
      return;
    }
    const uint8_t* src = blocks + rows[r] * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      VF w0, w1;
      dequant<BT>(src + b * kBlockBytes<BT>, w0, w1);
      store_f32(o + b * kQuantBlockSize, w0);
      store_f32(o + b * kQuantBlockSize + kL, w1);
    }
  });
}
}  // namespace

void dequantize_rows(const uint8_t* blocks, BlockType type, int64_t N, int64_t K, const int64_t* rows, int64_t R,
                     float* out, int num_threads) {
  if (type == BlockType::kQ4_1)
    dequantize_rows_t<BlockType::kQ4_1>(blocks, N, K, rows, R, out, num_threads);
  else
    dequantize_rows_t<BlockType::kQ8_0>(blocks, N, K, rows, R, out, num_threads);
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
