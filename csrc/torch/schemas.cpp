// Every op schema of the decodekit library, in one place. The kernels are
// registered per family in csrc/torch/<family>.cpp (CPU and Meta) and
// <family>_cuda.cpp (CUDA).
#include <torch/library.h>

TORCH_LIBRARY(decodekit, m) {
  m.def(
      "softmax(Tensor logits, Tensor? temperature, float temperature_val, int vocab_size, "
      "bool deterministic) -> Tensor");
  m.def("argmax(Tensor logits, int vocab_size) -> (Tensor, Tensor)");
  m.def(
      "sample_from_logits(Tensor logits, Tensor? temperature, float temperature_val, "
      "Tensor? top_k, int top_k_val, Tensor? top_p, float top_p_val, Tensor? min_p, float min_p_val, "
      "Tensor? seed, int seed_val, Tensor? offset, int offset_val, int vocab_size, "
      "bool deterministic, bool return_logprobs, int top_logprobs, bool raw_logprobs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sample_from_probs(Tensor probs, Tensor? top_k, int top_k_val, Tensor? top_p, float top_p_val, "
      "Tensor? min_p, float min_p_val, Tensor? seed, int seed_val, Tensor? offset, int offset_val, "
      "int vocab_size, bool deterministic, bool return_logprobs, int top_logprobs, bool raw_logprobs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "filter_probs(Tensor probs, Tensor? top_k, int top_k_val, Tensor? top_p, float top_p_val, "
      "Tensor? min_p, float min_p_val, int vocab_size) -> (Tensor, Tensor)");
  m.def("top_k_mask_logits(Tensor logits, Tensor? top_k, int top_k_val, int vocab_size) -> (Tensor, Tensor)");
  m.def(
      "processed_probs(Tensor logits, Tensor? temperature, float temperature_val, Tensor? top_k, int top_k_val, "
      "Tensor? top_p, float top_p_val, Tensor? min_p, float min_p_val, int vocab_size, bool deterministic) "
      "-> (Tensor probs, Tensor valid)");
  m.def(
      "apply_penalties(Tensor logits, Tensor? repetition_penalty, float repetition_val, "
      "Tensor? frequency_penalty, float frequency_val, Tensor? presence_penalty, float presence_val, "
      "Tensor? token_ids, Tensor? token_counts, Tensor? logit_bias, Tensor? bias_ids, Tensor? bias_values, "
      "Tensor? mask, bool mask_allows, int vocab_size) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // blocks: uint8, N rows of K / 32 GGML blocks of block_type ("q4_1" or "q8_0").
  m.def("linear_quantized(Tensor x, Tensor blocks, str block_type, int N, int K, Tensor? bias) -> Tensor");
  // Validation of probability rows for the Python wrappers: status 0 ok, 1 a negative / NaN / infinite entry,
  // 2 a row without positive mass in [0, vocab_size) (need_mass). The public name returning an int is kept
  // until its callers move to the private op.
  m.def("_check_probability_rows(Tensor probs, int vocab_size, bool need_mass) -> Tensor");
  m.def("check_probability_rows(Tensor probs, int vocab_size, bool need_mass) -> int");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rope_(Tensor(a!) x, int num_heads, Tensor cos_table, Tensor sin_table, Tensor positions) -> ()");
  // One Llama block of the paged forward: x [B, T, H] (the residual stream) and the layer's paged KV cache are
  // written in place. Weight types: "f32" (float32 [N, K]) or "q4_1" / "q8_0" (uint8 GGML blocks).
  m.def(
      "decoder_layer(Tensor(a!) x, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, "
      "Tensor block_tables, Tensor seq_lens, Tensor positions, Tensor cos_table, Tensor sin_table, "
      "Tensor attn_norm, Tensor wqkv, str wqkv_type, Tensor wo, str wo_type, Tensor ffn_norm, "
      "Tensor w_gate_up, str gate_up_type, Tensor w_down, str down_type, int num_heads, int num_kv_heads, "
      "int intermediate_size, float eps, float scale, str kv_layout, Tensor? tree_mask=None) -> ()");
  m.def(
      "chain_speculative_sampling(Tensor? draft_probs, Tensor draft_token_ids, Tensor target_probs, Tensor? seed, "
      "int seed_val, Tensor? offset, int offset_val, int vocab_size) -> (Tensor, Tensor, Tensor)");
  // target: float logits [B, K + 1, V] or int64 target token ids [B, K + 1].
  m.def(
      "greedy_verify(Tensor draft_token_ids, Tensor target, int vocab_size) "
      "-> (Tensor output_token_ids, Tensor num_accepted, Tensor num_emitted)");
  // Draft trees: candidates / parents int64 [B, N] (node 0 the root, -1 padding / the root's parent),
  // target_probs float32 [B, N, V]; outputs [B, max_depth + 1], [B], [B], [B, max_depth + 1].
  m.def(
      "tree_speculative_sampling(Tensor candidates, Tensor parents, Tensor target_probs, Tensor? seed, int seed_val, "
      "Tensor? offset, int offset_val, int vocab_size, int max_depth) "
      "-> (Tensor output_token_ids, Tensor num_accepted, Tensor num_emitted, Tensor accepted_nodes)");
  m.def(
      "typical_acceptance(Tensor candidates, Tensor parents, Tensor target_probs, Tensor? epsilon, float epsilon_val, "
      "Tensor? delta, float delta_val, Tensor? seed, int seed_val, Tensor? offset, int offset_val, int vocab_size, "
      "int max_depth) -> (Tensor output_token_ids, Tensor num_accepted, Tensor num_emitted, Tensor accepted_nodes)");
  // target: float logits [B, N, V] or int64 target token ids [B, N].
  m.def(
      "greedy_tree_verify(Tensor candidates, Tensor parents, Tensor target, int vocab_size, int max_depth) "
      "-> (Tensor output_token_ids, Tensor num_accepted, Tensor num_emitted, Tensor accepted_nodes)");
  m.def(
      "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, str kv_layout, Tensor? tree_mask=None) -> Tensor");
  // KV cache: write new keys/values into the caches in place.
  m.def(
      "append_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor seq_lens, "
      "str kv_layout) -> ()");
  m.def(
      "append_paged_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, "
      "Tensor slot_mapping, str kv_layout) -> ()");
  // KV cache after tree verification: move each row's accepted path to consecutive positions in place.
  m.def(
      "compact_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor start, Tensor accepted_nodes, "
      "str kv_layout) -> ()");
  m.def(
      "compact_paged_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_tables, Tensor start, "
      "Tensor accepted_nodes, str kv_layout) -> ()");
}
