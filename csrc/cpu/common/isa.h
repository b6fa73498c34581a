// The per-instruction-set kernel table (the idea of ATen's DispatchStub).
//
// Every CPU kernel file is compiled once per instruction set (AVX-512, AVX2,
// baseline x86-64; CMakeLists.txt) into its own namespace DK_ISA, where it
// defines one function per kernel of the type its family header declares.
// cpu/common/kernel_table.cpp, compiled the same way, fills one CpuKernels
// struct of pointers to them; dispatch.cpp picks the table the CPU supports
// once. Adding a kernel: its type in the family header, its definition in
// namespace DK_ISA, one line in DK_CPU_KERNELS. Every build gives the same
// bits (vec.h); the choice only changes speed.
#pragma once

#include "cpu/attention.h"
#include "cpu/kv_cache.h"
#include "cpu/layers.h"
#include "cpu/linear.h"
#include "cpu/penalties.h"
#include "cpu/sampling/sampling.h"
#include "cpu/speculative/speculative.h"

// The namespace of the build being compiled (set by CMakeLists.txt).
#ifndef DK_ISA
#define DK_ISA baseline
#endif

namespace decodekit {
namespace cpu {

// X(name, type): every kernel of the table.
#define DK_CPU_KERNELS(X)                                       \
  X(softmax, SoftmaxKernel)                                     \
  X(argmax, ArgmaxKernel)                                       \
  X(sample_from_logits, SampleFromLogitsKernel)                 \
  X(sample_from_probs, SampleFromProbsKernel)                   \
  X(filter_probs, FilterProbsKernel)                            \
  X(top_k_mask_logits, TopKMaskLogitsKernel)                    \
  X(processed_probs, ProcessedProbsKernel)                      \
  X(apply_penalties, ApplyPenaltiesKernel)                      \
  X(append_kv_cache, AppendKVCacheKernel)                       \
  X(append_paged_kv_cache, AppendPagedKVCacheKernel)            \
  X(compact_kv_cache, CompactKVCacheKernel)                     \
  X(compact_paged_kv_cache, CompactPagedKVCacheKernel)          \
  X(paged_attention, PagedAttentionKernel)                      \
  X(rms_norm, RmsNormKernel)                                    \
  X(silu_and_mul, SiluAndMulKernel)                             \
  X(rope_inplace, RopeInplaceKernel)                            \
  X(linear, LinearKernel)                                       \
  X(linear_quantized, LinearQuantizedKernel)                    \
  X(dequantize_rows, DequantizeRowsKernel)                      \
  X(decoder_layer, DecoderLayerKernel)                          \
  X(chain_speculative_sampling, ChainSpeculativeSamplingKernel) \
  X(greedy_verify, GreedyVerifyKernel)                          \
  X(tree_speculative_sampling, TreeSpeculativeSamplingKernel)   \
  X(typical_acceptance, TypicalAcceptanceKernel)                \
  X(greedy_tree_verify, GreedyTreeVerifyKernel)                 \
  X(check_probability_rows, CheckProbabilityRowsKernel)

struct CpuKernels {
#define DK_KERNEL_MEMBER(name, type) type* name;
  DK_CPU_KERNELS(DK_KERNEL_MEMBER)
#undef DK_KERNEL_MEMBER
};

// The table of the instruction set the kernels run with, chosen once at the
// first call: the best the CPU supports, or DECODEKIT_CPU_ISA (avx512, avx2,
// baseline) when it names one the CPU supports.
const CpuKernels& kernels();

// The name of that instruction set: "avx512", "avx2" or "baseline".
const char* active_isa();

// Each build's kernels and its table.
#define DK_KERNEL_DECL(name, type) type name;
#define DK_ISA_KERNELS(ns)        \
  namespace ns {                  \
  DK_CPU_KERNELS(DK_KERNEL_DECL)  \
  extern const CpuKernels kTable; \
  }
DK_ISA_KERNELS(avx512)
DK_ISA_KERNELS(avx2)
DK_ISA_KERNELS(baseline)
#undef DK_ISA_KERNELS
#undef DK_KERNEL_DECL

}  // namespace cpu
}  // namespace decodekit
