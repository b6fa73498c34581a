// Torch bindings of the layers family: rms_norm, silu_and_mul, rope_, linear,
// linear_quantized and decoder_layer (CPU and Meta).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cpu/common/fpenv.h"
#include "cpu/common/isa.h"
#include "torch/checks.h"
#include "torch/threads.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
  const dk::cpu::IeeeDenormals ieee;
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() >= 1 &&
                  weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.is_contiguous(),
              "decodekit: rms_norm wants float32 x [..., H] and weight [H]");
  auto xc = x.contiguous();
  auto y = at::empty(xc.sizes(), xc.options());
  const int64_t H = xc.size(-1);
  if (xc.numel() == 0) return y;
  dk::cpu::kernels().rms_norm(xc.data_ptr<float>(), xc.numel() / H, H, H, weight.data_ptr<float>(),
                              static_cast<float>(eps), y.data_ptr<float>(), H, dk::torch_ops::num_threads());
  return y;
}

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "decodekit: silu_and_mul wants float32 x [..., 2 * I]");
  auto xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  const int64_t I = sizes.back() / 2;
  sizes.back() = I;
  auto y = at::empty(sizes, xc.options());
  if (y.numel() == 0) return y;
  dk::cpu::kernels().silu_and_mul(xc.data_ptr<float>(), xc.numel() / (2 * I), I, 2 * I, y.data_ptr<float>(), I,
                                  dk::torch_ops::num_threads());
  return y;
}

void rope_inplace_cpu(const at::Tensor& x, int64_t num_heads, const at::Tensor& cos_table, const at::Tensor& sin_table,
                      const at::Tensor& positions) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "decodekit: rope_ wants float32 x [N, C] with unit column stride");
  TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat && cos_table.dim() == 2 &&
                  cos_table.sizes() == sin_table.sizes() && cos_table.is_contiguous() && sin_table.is_contiguous(),
              "decodekit: rope_ wants contiguous float32 cos/sin tables [P, D] of one shape");
  const int64_t D = cos_table.size(1), P = cos_table.size(0), N = x.size(0);
  TORCH_CHECK(D % 2 == 0 && num_heads >= 0 && num_heads * D <= x.size(1),
              "decodekit: rope_ needs an even head_dim and num_heads * head_dim <= x.size(1)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == N &&
                  positions.is_contiguous(),
              "decodekit: rope_ wants int64 positions [N]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(pos[n] >= 0 && pos[n] < P, "decodekit: rope_ position ", pos[n], " outside the table [0, ", P, ")");
  if (N == 0 || num_heads == 0) return;
  dk::cpu::kernels().rope_inplace(x.data_ptr<float>(), N, num_heads, D, x.stride(0), cos_table.data_ptr<float>(),
                                  sin_table.data_ptr<float>(), pos, dk::torch_ops::num_threads());
}

// ------------------------------------------------------------- linear ----
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "decodekit: linear wants x [M, K] and weight [N, K] with the same K, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "decodekit: linear is float32");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "decodekit: x rows must be contiguous");
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1, "decodekit: weight rows must be contiguous");
  TORCH_CHECK(weight.device() == x.device(), "decodekit: weight is on ", weight.device(), ", x on ", x.device());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->device() == x.device(),
                "decodekit: bias must be a contiguous float32 [N] tensor on x's device");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return y;
  dk::cpu::kernels().linear(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), weight.data_ptr<float>(),
                            weight.size(0), weight.stride(0), b, y.data_ptr<float>(), y.stride(0),
                            dk::torch_ops::num_threads());
  return y;
}

// ------------------------------------------------------ linear_quantized ----
// block_type -> kernel enum and bytes per block of 32 weights; a clear error otherwise.
std::pair<dk::cpu::BlockType, int64_t> parse_block_type(const std::string& block_type) {
  std::pair<dk::cpu::BlockType, int64_t> r;
  TORCH_CHECK_VALUE(block_type_of(block_type, &r.first, &r.second),
                    "decodekit: linear_quantized block_type must be 'q4_1' or 'q8_0', got '", block_type, "'");
  return r;
}

// blocks_numel: blocks.numel(), or nullopt when it is symbolic (fake tensors under tracing).
void check_linear_quantized(const at::Tensor& x, const at::Tensor& blocks, std::optional<int64_t> blocks_numel,
                            const std::string& block_type, int64_t N, int64_t K,
                            const std::optional<at::Tensor>& bias) {
  const int64_t bytes = parse_block_type(block_type).second;
  TORCH_CHECK_VALUE(N >= 0, "decodekit: linear_quantized N must be >= 0, got ", N);
  TORCH_CHECK_VALUE(K > 0 && K % 32 == 0,
                    "decodekit: linear_quantized K must be a positive multiple of 32 (the block size), got ", K);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.sym_size(1) == K, "decodekit: linear_quantized wants x [M, K=", K, "], got ",
                    x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "decodekit: linear_quantized x must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(blocks.scalar_type() == at::kByte, "decodekit: linear_quantized blocks must be uint8, got ",
                   blocks.scalar_type());
  TORCH_CHECK_VALUE(!blocks_numel.has_value() || *blocks_numel == N * (K / 32) * bytes,
                    "decodekit: linear_quantized blocks must hold N * K / 32 * ", bytes, " = ", N * (K / 32) * bytes,
                    " bytes for ", block_type, " [N=", N, ", K=", K, "], got ", blocks_numel.value_or(-1));
  TORCH_CHECK_VALUE(blocks.device() == x.device(), "decodekit: linear_quantized blocks are on ", blocks.device(),
                    ", x on ", x.device());
  if (bias.has_value())
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->sym_size(0) == N && bias->scalar_type() == at::kFloat && bias->device() == x.device(),
        "decodekit: linear_quantized bias must be a float32 [N=", N, "] tensor on x's device");
}

at::Tensor linear_quantized_cpu(const at::Tensor& x, const at::Tensor& blocks, const std::string& block_type, int64_t N,
                                int64_t K, const std::optional<at::Tensor>& bias) {
  check_linear_quantized(x, blocks, blocks.numel(), block_type, N, K, bias);
  TORCH_CHECK_VALUE(blocks.is_contiguous(), "decodekit: linear_quantized blocks must be contiguous");
  TORCH_CHECK_VALUE(x.stride(1) == 1, "decodekit: linear_quantized x rows must be contiguous");
  at::Tensor bc;
  const float* b = nullptr;
  if (bias.has_value()) {
    bc = bias->contiguous();
    b = bc.data_ptr<float>();
  }
  auto y = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0 || N == 0) return y;
  dk::cpu::kernels().linear_quantized(x.data_ptr<float>(), x.size(0), K, x.stride(0), blocks.data_ptr<uint8_t>(),
                                      parse_block_type(block_type).first, N, b, y.data_ptr<float>(), y.stride(0),
                                      dk::torch_ops::num_threads());
  return y;
}

// -------------------------------------------------------- decoder_layer ----
// One Llama block of the paged forward in one call (cpu/layers.h,
// DecoderLayerKernel): the checks of torch/checks.cpp, then the kernel on raw
// pointers, with x, k_cache and v_cache written in place.
void decoder_layer_cpu(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       const at::Tensor& positions, const at::Tensor& cos_table, const at::Tensor& sin_table,
                       const at::Tensor& attn_norm, const at::Tensor& wqkv, const std::string& wqkv_type,
                       const at::Tensor& wo, const std::string& wo_type, const at::Tensor& ffn_norm,
                       const at::Tensor& w_gate_up, const std::string& gate_up_type, const at::Tensor& w_down,
                       const std::string& down_type, int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size,
                       double eps, double scale, const std::string& kv_layout,
                       const std::optional<at::Tensor>& tree_mask) {
  dk::cpu::DecoderLayerParams p;
  {
    // eps and scale become float32 here, as in rms_norm and paged_attention: with IEEE denormals.
    const dk::cpu::IeeeDenormals ieee;
    p = check_decoder_layer(x, k_cache, v_cache, slot_mapping, block_tables, seq_lens, positions, cos_table, sin_table,
                            attn_norm, wqkv, wqkv_type, wo, wo_type, ffn_norm, w_gate_up, gate_up_type, w_down,
                            down_type, num_heads, num_kv_heads, intermediate_size, eps, scale, kv_layout, true,
                            tree_mask);
  }
  if (p.B * p.T == 0) return;
  dk::cpu::kernels().decoder_layer(x.data_ptr<float>(), p, dk::torch_ops::num_threads());
}

// ------------------------------------------------------------- Meta ----
at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) {
  require_meta(x, "x");
  return at::empty(x.sizes(), x.options());
}

at::Tensor silu_and_mul_meta(const at::Tensor& x) {
  require_meta(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "decodekit: silu_and_mul wants x [..., 2 * I]");
  auto sizes = x.sizes().vec();
  sizes.back() /= 2;
  return at::empty(sizes, x.options());
}

void rope_inplace_meta(const at::Tensor& x, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  require_meta(x, "x");
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>&) {
  require_meta(x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "decodekit: linear shape mismatch");
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

at::Tensor linear_quantized_meta(const at::Tensor& x, const at::Tensor& blocks, const std::string& block_type,
                                 int64_t N, int64_t K, const std::optional<at::Tensor>& bias) {
  require_meta(x, "x");
  check_linear_quantized(x, blocks, blocks.sym_numel().maybe_as_int(), block_type, N, K, bias);
  return at::empty_symint({x.sym_size(0), c10::SymInt(N)}, x.options());
}

void decoder_layer_meta(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        const at::Tensor& positions, const at::Tensor& cos_table, const at::Tensor& sin_table,
                        const at::Tensor& attn_norm, const at::Tensor& wqkv, const std::string& wqkv_type,
                        const at::Tensor& wo, const std::string& wo_type, const at::Tensor& ffn_norm,
                        const at::Tensor& w_gate_up, const std::string& gate_up_type, const at::Tensor& w_down,
                        const std::string& down_type, int64_t num_heads, int64_t num_kv_heads,
                        int64_t intermediate_size, double eps, double scale, const std::string& kv_layout,
                        const std::optional<at::Tensor>& tree_mask) {
  if (tree_mask.has_value()) require_meta(*tree_mask, "tree_mask");
  for (auto [t, name] : {std::pair{&x, "x"},
                         {&k_cache, "k_cache"},
                         {&v_cache, "v_cache"},
                         {&slot_mapping, "slot_mapping"},
                         {&block_tables, "block_tables"},
                         {&seq_lens, "seq_lens"},
                         {&positions, "positions"},
                         {&cos_table, "cos_table"},
                         {&sin_table, "sin_table"},
                         {&attn_norm, "attn_norm"},
                         {&wqkv, "wqkv"},
                         {&wo, "wo"},
                         {&ffn_norm, "ffn_norm"},
                         {&w_gate_up, "w_gate_up"},
                         {&w_down, "w_down"}})
    require_meta(*t, name);
  check_decoder_layer(x, k_cache, v_cache, slot_mapping, block_tables, seq_lens, positions, cos_table, sin_table,
                      attn_norm, wqkv, wqkv_type, wo, wo_type, ffn_norm, w_gate_up, gate_up_type, w_down, down_type,
                      num_heads, num_kv_heads, intermediate_size, eps, scale, kv_layout, false, tree_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("rope_", &rope_inplace_cpu);
  m.impl("linear", &linear_cpu);
  m.impl("linear_quantized", &linear_quantized_cpu);
  m.impl("decoder_layer", &decoder_layer_cpu);
}

TORCH_LIBRARY_IMPL(decodekit, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("silu_and_mul", &silu_and_mul_meta);
  m.impl("rope_", &rope_inplace_meta);
  m.impl("linear", &linear_meta);
  m.impl("linear_quantized", &linear_quantized_meta);
  m.impl("decoder_layer", &decoder_layer_meta);
}
