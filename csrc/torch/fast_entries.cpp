// The C++ fast entries of decodekit.sample_from_logits and decodekit.softmax
// (the common call checked here and run on the CPU kernel directly, bypassing the
// dispatcher; see the comment below), and of the model's layer loop
// (decoder_layer over every block in one call).
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu/common/fpenv.h"
#include "cpu/common/isa.h"
#include "cpu/layers.h"
#include "cpu/linear.h"
#include "torch/checks.h"
#include "torch/threads.h"

namespace dk = decodekit;
using namespace decodekit::torch_ops;

namespace {
// ------------------------------------------- sample_from_logits fast path ----
// decodekit.sample_from_logits runs once per decode step, usually right after a
// model forward has evicted the interpreter's and the dispatcher's code and data
// from the caches; calling the op through torch.ops then costs tens of
// microseconds before the kernel starts. For the common call (a plain CPU
// tensor, parameters that are plain numbers or CPU tensors of the kernel's
// dtypes, no extras) this entry checks the arguments and calls the CPU kernel
// directly, with one output allocation.
// It returns the ids, or None whenever anything is unusual (a tensor subclass,
// another device, requires_grad, a torch function or dispatch mode, a
// parameter out of range, a failed check, an invalid row): the Python wrapper
// then takes its full path, which raises the precise error.

// A tensor the fast entries may read through data_ptr(): dense CPU storage and no
// dispatch key beyond autograd's and autocast's (no functionalization, vmap
// batching, negative or conjugate bit, zero tensor, ...).
bool plain_cpu_tensor(const at::Tensor& t) {
  static const c10::DispatchKeySet allowed({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                            c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});
  const c10::DispatchKeySet ks = t.key_set();
  return ks.has(c10::DispatchKey::CPU) && allowed.isSupersetOf(ks) && t.layout() == at::kStrided && !t.is_neg() &&
         !t.is_conj() && storage_holds(t);
}

// One parameter of the fast entry: a plain Python int (not bool), a float
// unless `integer`, or an exact CPU tensor of `dtype` with B contiguous values.
// False: the caller takes the full path.
template <typename T>
bool fast_param(PyObject* o, bool integer, at::ScalarType dtype, int64_t B, dk::RowParam<T>& out,
                double* value = nullptr) {
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    out.scalar = static_cast<T>(v);
    if (value) *value = static_cast<double>(v);
    return true;
  }
  if (!integer && PyFloat_CheckExact(o)) {
    const double d = PyFloat_AS_DOUBLE(o);
    out.scalar = static_cast<T>(d);
    if (value) *value = d;
    return true;
  }
  if (THPVariable_CheckExact(o)) {
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!plain_cpu_tensor(t) || t.scalar_type() != dtype || t.dim() != 1 || t.size(0) != B || !t.is_contiguous())
      return false;
    out.values = static_cast<const T*>(t.data_ptr());
    if (value) *value = std::numeric_limits<double>::quiet_NaN();  // no scalar range check
    return true;
  }
  return false;
}

// No torch function mode, dispatch mode or torch.func transform is active (each
// would want to see the op).
bool no_python_modes() {
  return !(at::impl::PythonTorchFunctionTLS::stack_len() > 0 || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
           c10::impl::tls_local_dispatch_key_set().included_.has_any(c10::DispatchKeySet(
               {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode})));
}

// The logits of a fast entry: an exact, plain CPU tensor [B >= 1, V] of a
// kernel dtype with contiguous rows, no torch function or dispatch mode
// active, and deterministic a bool. False: the caller takes the full path.
// With `middle_one` the logits may also be [B, 1, V] (the decode loop's plain step), read as
// [B, V].
bool fast_logits(pybind11::handle logits_obj, pybind11::handle deterministic, dk::LogitsView* view,
                 bool middle_one = false) {
  if (!THPVariable_CheckExact(logits_obj.ptr())) return false;
  if (deterministic.ptr() != Py_True && deterministic.ptr() != Py_False) return false;
  if (!no_python_modes()) return false;
  const at::Tensor& logits = THPVariable_Unpack(logits_obj.ptr());
  if (!plain_cpu_tensor(logits) || logits.requires_grad()) return false;
  const bool three = middle_one && logits.dim() == 3 && logits.size(1) == 1;
  if (logits.dim() != 2 && !three) return false;
  const int64_t B = logits.size(0), V = logits.size(three ? 2 : 1);
  const int64_t row_stride = logits.stride(0), col_stride = logits.stride(three ? 2 : 1);
  dk::ScalarKind kind;
  if (!kind_of(logits.scalar_type(), &kind)) return false;
  if (B == 0 || V == 0 || V >= (int64_t{1} << 31) || (col_stride != 1 && V != 1)) return false;
  *view = dk::LogitsView{logits.data_ptr(), kind, B, V, row_stride, V};
  return true;
}

constexpr double kFastFltMax = 3.4028234663852886e38, kFastTiny = 1.1754943508222875e-38;

// A plain-number temperature the full path would take as it is.
bool fast_temperature_ok(double t) { return t >= 0.0 && t <= kFastFltMax && !(t > 0.0 && t < kFastTiny); }

pybind11::object sample_from_logits_fast(pybind11::handle logits_obj, pybind11::handle temperature,
                                         pybind11::handle top_k, pybind11::handle top_p, pybind11::handle min_p,
                                         pybind11::handle seed, pybind11::handle offset, pybind11::handle deterministic,
                                         bool as_list) {
  dk::LogitsView view;
  if (!fast_logits(logits_obj, deterministic, &view, as_list)) return pybind11::none();
  const int64_t B = view.batch;
  dk::SamplingParams prm;
  double t = 0.0, p = 0.0, m = 0.0, o = 0.0;
  {
    // Parameters become float32 here: convert them with IEEE denormals whatever the caller set.
    const dk::cpu::IeeeDenormals ieee;
    if (!fast_param(temperature.ptr(), false, at::kFloat, B, prm.temperature, &t) ||
        !fast_param(top_k.ptr(), true, at::kLong, B, prm.top_k) ||
        !fast_param(top_p.ptr(), false, at::kDouble, B, prm.top_p, &p) ||
        !fast_param(min_p.ptr(), false, at::kFloat, B, prm.min_p, &m) ||
        !fast_param(seed.ptr(), true, at::kLong, B, prm.seed) ||
        !fast_param(offset.ptr(), true, at::kLong, B, prm.offset, &o))
      return pybind11::none();
  }
  // Plain numbers are range-checked here (the kernel sees them rounded to float32;
  // tensor values out of range make their rows invalid, and so the full path).
  if (!prm.temperature.values && !fast_temperature_ok(t)) return pybind11::none();
  if (!prm.top_p.values && !(p >= 0.0 && p <= 1.0)) return pybind11::none();
  if (!prm.min_p.values && !(m >= 0.0 && m <= 1.0)) return pybind11::none();
  if (!prm.offset.values && o < 0.0) return pybind11::none();
  if (prm.offset.values)
    for (int64_t i = 0; i < B; ++i)
      if (prm.offset.values[i] < 0) return pybind11::none();
  const bool det = deterministic.ptr() == Py_True;
  at::Tensor ids;
  bool all_valid = true;
  {
    pybind11::gil_scoped_release no_gil;
    try {
      ids = at::detail::empty_cpu({B}, at::kLong);
      bool valid_small[64];
      std::unique_ptr<bool[]> valid_big(B > 64 ? new bool[B] : nullptr);
      bool* valid = B > 64 ? valid_big.get() : valid_small;
      dk::cpu::kernels().sample_from_logits(view, prm, dk::LogprobRequest{}, det, dk::torch_ops::num_threads(),
                                            ids.data_ptr<int64_t>(), valid);
      for (int64_t i = 0; i < B; ++i) all_valid = all_valid && valid[i];
    } catch (const std::exception&) {
      all_valid = false;
    }
  }
  if (!all_valid) return pybind11::none();
  if (as_list) {
    pybind11::list out(B);
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) out[i] = pybind11::int_(id[i]);
    return std::move(out);
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(ids)));
}

// decodekit.softmax(logits, temperature) in the same way: the probabilities,
// or None (then the full path runs, and raises for invalid rows).
pybind11::object softmax_fast(pybind11::handle logits_obj, pybind11::handle temperature,
                              pybind11::handle deterministic) {
  dk::LogitsView view;
  if (!fast_logits(logits_obj, deterministic, &view)) return pybind11::none();
  dk::RowParam<float> temp;
  double t = 0.0;
  {
    const dk::cpu::IeeeDenormals ieee;
    if (!fast_param(temperature.ptr(), false, at::kFloat, view.batch, temp, &t)) return pybind11::none();
  }
  if (!temp.values && !fast_temperature_ok(t)) return pybind11::none();
  const bool det = deterministic.ptr() == Py_True;
  at::Tensor probs;
  bool all_valid = true;
  {
    pybind11::gil_scoped_release no_gil;
    try {
      probs = at::detail::empty_cpu({view.batch, view.vocab}, at::kFloat);
      float* out = probs.data_ptr<float>();
      dk::cpu::kernels().softmax(view, temp, det, dk::torch_ops::num_threads(), out);
      for (int64_t b = 0; b < view.batch; ++b) all_valid = all_valid && !std::isnan(out[b * view.vocab]);
    } catch (const std::exception&) {
      all_valid = false;
    }
  }
  if (!all_valid) return pybind11::none();
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(probs)));
}

// --------------------------------------------------- the model's layer loop ----
// LlamaModel.forward_paged calls torch.ops.decodekit.decoder_layer once per
// block; through the dispatcher each call costs about 10 microseconds of
// argument boxing before the kernel starts (25 arguments), 2% of a decode step
// of SmolLM2-135M. This entry takes the whole loop: every block's arguments are
// checked as the op checks them (check_decoder_layer) before anything is
// written, then the kernel runs block after block without the GIL. It returns
// False, having written nothing, whenever anything is unusual (a tensor
// subclass or non-plain tensor, a torch function or dispatch mode, a failed
// check): the caller then takes the op, which raises the precise error.
//   layers: one tuple per block, (attn_norm, wqkv, wqkv_type, wo, wo_type,
//   ffn_norm, w_gate_up, gate_up_type, w_down, down_type) as the op takes them.
// A str argument's UTF-8 text, or false (and no pending Python error) when it has none (e.g. a
// lone surrogate).
bool fast_utf8(PyObject* s, std::string* out) {
  if (!PyUnicode_CheckExact(s)) return false;
  const char* u = PyUnicode_AsUTF8(s);
  if (u == nullptr) {
    PyErr_Clear();
    return false;
  }
  *out = u;
  return true;
}

bool fast_tensor(pybind11::handle o, at::Tensor* out) {
  if (!THPVariable_CheckExact(o.ptr())) return false;
  const at::Tensor& t = THPVariable_Unpack(o.ptr());
  if (!plain_cpu_tensor(t) || t.requires_grad()) return false;
  *out = t;
  return true;
}

// What decoder_layers_fast checked about the blocks of one model on one cache, kept (by the
// caller, on the cache object) for the next steps. The block arguments and the cache tensors
// are the same Python objects from step to step, but a step that has just streamed the model's
// weights through the caches finds their Python and tensor objects cold: reconverting and
// rechecking 30 blocks cost ~0.1 ms of cache misses per step on the 2-core EPYC. A plan holds
// strong references to the objects it checked (so none can be freed and its address reused),
// their tensors and storages, and each tensor's layout when checked (storage, data pointer,
// offset, dtype, sizes, strides, and the storage's byte count). A later call reuses the
// per-block part of its checks only when the same objects come again with exactly that layout
// (an in-place resize_, set_, as_strided_ or .data assignment changes some of it), and checks
// the per-step arguments and block 0 in full as always. The layout reads are independent
// loads, prefetched together first, so they cost a few microseconds even when cold.
struct HeldLayout {
  const c10::TensorImpl* impl = nullptr;
  const c10::StorageImpl* storage = nullptr;
  const void* data = nullptr;
  size_t nbytes = 0;
  int64_t offset = 0;
  caffe2::TypeMeta dtype;
  int64_t dim = 0;
  int64_t sizes[4] = {0, 0, 0, 0}, strides[4] = {0, 0, 0, 0};

  static bool of(const at::Tensor& t, HeldLayout* out) {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (!impl->has_storage() || impl->dim() > 4) return false;
    out->impl = impl;
    out->storage = impl->storage().unsafeGetStorageImpl();
    out->data = impl->storage().data();
    out->nbytes = impl->storage().nbytes();
    out->offset = impl->storage_offset();
    out->dtype = impl->dtype();
    out->dim = impl->dim();
    for (int64_t d = 0; d < out->dim; ++d) out->sizes[d] = impl->sizes()[d], out->strides[d] = impl->strides()[d];
    return true;
  }
  bool same(const HeldLayout& now) const {
    if (storage != now.storage || data != now.data || nbytes != now.nbytes || offset != now.offset ||
        dtype != now.dtype || dim != now.dim)
      return false;
    for (int64_t d = 0; d < dim; ++d)
      if (sizes[d] != now.sizes[d] || strides[d] != now.strides[d]) return false;
    return true;
  }
};

struct DecoderLayersPlan {
  std::vector<pybind11::object> refs;  // layers[l], k_caches[l], v_caches[l] for each l
  std::vector<at::Tensor> held;        // each block's 6 weight tensors and 2 caches
  std::vector<c10::Storage> storages;  // their storages (kept alive, so no address is reused)
  std::vector<HeldLayout> layouts;     // their layouts when checked
  std::vector<std::string> types;      // each block's 4 weight types
  std::vector<dk::cpu::DecoderLayerParams> params;
  int64_t num_heads = 0, num_kv_heads = 0, intermediate = 0;
  double eps = 0.0, scale = 0.0;
  std::string kv_layout;

  bool matches(const pybind11::list& layers, const pybind11::list& k_caches, const pybind11::list& v_caches, int64_t nh,
               int64_t nkv, int64_t inter, double e, double sc, const std::string& layout) const {
    const size_t L = layers.size();
    if (params.size() != L || nh != num_heads || nkv != num_kv_heads || inter != intermediate || e != eps ||
        sc != scale || layout != kv_layout)
      return false;
    for (size_t l = 0; l < L; ++l)
      if (PyList_GET_ITEM(layers.ptr(), l) != refs[3 * l].ptr() ||
          PyList_GET_ITEM(k_caches.ptr(), l) != refs[3 * l + 1].ptr() ||
          PyList_GET_ITEM(v_caches.ptr(), l) != refs[3 * l + 2].ptr())
        return false;
    // The tensors' and storages' metadata, fetched together (independent cold lines).
    for (const HeldLayout& h : layouts) {
      __builtin_prefetch(h.impl);
      __builtin_prefetch(reinterpret_cast<const char*>(h.impl) + 64);
      __builtin_prefetch(h.storage);
    }
    for (size_t i = 0; i < held.size(); ++i) {
      HeldLayout now;
      if (held[i].unsafeGetTensorImpl() != layouts[i].impl || !HeldLayout::of(held[i], &now) || !layouts[i].same(now))
        return false;
    }
    return true;
  }
};

// The LM head after the last block (decoder_layers_fast's `head`): the final RMSNorm of each
// sequence's last new token, then the product with the head's weight, with the kernels and
// arguments of LlamaModel._head's op path (rms_norm, then linear_quantized or linear on
// contiguous rows), so the same bits.
struct FastHead {
  at::Tensor norm, weight;
  dk::cpu::LayerWeight w;
  int64_t N = 0;
  at::Tensor token_ids;  // a reduced head's int64 [N] ids (LlamaModel.head_token_ids), or undefined
  int64_t V = 0;         // then the vocabulary: the logits are [B, V], -inf off the head's tokens
};

// head: a tuple (final norm weight float32 [H], weight, its type 'f32' / 'q4_1' / 'q8_0', N)
// for x [B, T >= 1, H]; or with two more items (token_ids int64 [N], distinct ids in [0, V); V)
// for a head over N tokens of the vocabulary (LlamaModel._project: -inf elsewhere). False: the
// caller takes the op path.
bool fast_head(pybind11::handle head_obj, const at::Tensor& x, FastHead* out) {
  if (!PyTuple_CheckExact(head_obj.ptr())) return false;
  const Py_ssize_t items = PyTuple_GET_SIZE(head_obj.ptr());
  if (items != 4 && items != 6) return false;
  PyObject* type_obj = PyTuple_GET_ITEM(head_obj.ptr(), 2);
  PyObject* n_obj = PyTuple_GET_ITEM(head_obj.ptr(), 3);
  std::string type;
  if (!fast_utf8(type_obj, &type) || !PyLong_CheckExact(n_obj)) return false;
  if (!fast_tensor(PyTuple_GET_ITEM(head_obj.ptr(), 0), &out->norm) ||
      !fast_tensor(PyTuple_GET_ITEM(head_obj.ptr(), 1), &out->weight))
    return false;
  int overflow = 0;
  out->N = PyLong_AsLongLongAndOverflow(n_obj, &overflow);
  if (overflow != 0 || out->N <= 0 || out->N >= (int64_t{1} << 31) || x.dim() != 3 || x.size(1) == 0) return false;
  const int64_t H = x.size(2);
  const at::Tensor& nw = out->norm;
  if (nw.scalar_type() != at::kFloat || nw.dim() != 1 || nw.size(0) != H || !nw.is_contiguous()) return false;
  try {
    out->w = check_layer_weight(out->weight, type, out->N, H, "lm_head", "head type", x);
  } catch (const std::exception&) {
    return false;
  }
  if (items == 6) {
    PyObject* v_obj = PyTuple_GET_ITEM(head_obj.ptr(), 5);
    if (!fast_tensor(PyTuple_GET_ITEM(head_obj.ptr(), 4), &out->token_ids) || !PyLong_CheckExact(v_obj)) return false;
    out->V = PyLong_AsLongLongAndOverflow(v_obj, &overflow);
    const at::Tensor& ids = out->token_ids;
    if (overflow != 0 || out->V < out->N || out->V >= (int64_t{1} << 31) || ids.scalar_type() != at::kLong ||
        ids.dim() != 1 || ids.size(0) != out->N || !ids.is_contiguous())
      return false;
    std::vector<bool> seen(static_cast<size_t>(out->V), false);  // distinct ids in [0, V)
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t j = 0; j < out->N; ++j) {
      if (id[j] < 0 || id[j] >= out->V || seen[id[j]]) return false;
      seen[id[j]] = true;
    }
  }
  return true;
}

// The plan argument of the fast entries: None, or a _DecoderLayersPlan. False: neither.
bool fast_plan(pybind11::handle plan_obj, DecoderLayersPlan** plan) {
  *plan = nullptr;
  if (plan_obj.is_none()) return true;
  try {
    *plan = plan_obj.cast<DecoderLayersPlan*>();
  } catch (const pybind11::cast_error&) {
    return false;
  }
  return true;
}

// The loop of decoder_layers_fast and decode_step_fast on checked-plain tensors: returns
// the logits (with a head), True, or False having written nothing.
pybind11::object layer_loop(at::Tensor x, const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens,
                            const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin,
                            const pybind11::list& k_caches, const pybind11::list& v_caches,
                            const pybind11::list& layers, int64_t num_heads, int64_t num_kv_heads,
                            int64_t intermediate_size, double eps, double scale, const std::string& kv_layout,
                            const std::optional<at::Tensor>& tree_mask, DecoderLayersPlan* plan,
                            pybind11::handle head_obj) {
  const pybind11::object no = pybind11::bool_(false);
  const size_t L = layers.size();
  if (k_caches.size() != L || v_caches.size() != L || L == 0) return no;
  // The head is checked before anything is written (x's shape is checked with block 0 below).
  FastHead head;
  const bool with_head = !head_obj.is_none();
  if (with_head && !fast_head(head_obj, x, &head)) return no;
  std::vector<dk::cpu::DecoderLayerParams> params(L);
  std::vector<at::Tensor> held;         // each block's 6 weight tensors and 2 caches, when not from a plan
  const at::Tensor* tensors = nullptr;  // the 8 L tensors checked (plan->held or held)
  try {
    const dk::cpu::IeeeDenormals ieee;  // eps and scale become float32 here, as in the op
    if (plan != nullptr &&
        plan->matches(layers, k_caches, v_caches, num_heads, num_kv_heads, intermediate_size, eps, scale, kv_layout)) {
      // Block 0 and the per-step arguments in full, then the other blocks' checked parts.
      const at::Tensor* h = tensors = plan->held.data();
      const std::string* t = plan->types.data();
      params[0] = check_decoder_layer(x, h[6], h[7], slots, tables, lens, pos, cos, sin, h[0], h[1], t[0], h[2], t[1],
                                      h[3], h[4], t[2], h[5], t[3], num_heads, num_kv_heads, intermediate_size, eps,
                                      scale, kv_layout, true, tree_mask);
      for (size_t l = 1; l < L; ++l) {
        const dk::cpu::DecoderLayerParams& q = plan->params[l];
        dk::cpu::DecoderLayerParams p = params[0];
        p.attn_norm = q.attn_norm, p.wqkv = q.wqkv, p.wo = q.wo, p.ffn_norm = q.ffn_norm;
        p.w_gate_up = q.w_gate_up, p.w_down = q.w_down, p.cache.k = q.cache.k, p.cache.v = q.cache.v;
        params[l] = p;
      }
    } else {
      held.resize(8 * L);
      tensors = held.data();
      std::vector<std::string> types(4 * L);
      for (size_t l = 0; l < L; ++l) {
        const pybind11::handle layer = layers[l];
        if (!PyTuple_CheckExact(layer.ptr()) || PyTuple_GET_SIZE(layer.ptr()) != 10) return no;
        at::Tensor* w = &held[8 * l];
        std::string* type = &types[4 * l];
        const int tensor_at[6] = {0, 1, 3, 5, 6, 8}, type_at[4] = {2, 4, 7, 9};
        for (int i = 0; i < 6; ++i)
          if (!fast_tensor(PyTuple_GET_ITEM(layer.ptr(), tensor_at[i]), &w[i])) return no;
        for (int i = 0; i < 4; ++i) {
          if (!fast_utf8(PyTuple_GET_ITEM(layer.ptr(), type_at[i]), &type[i])) return no;
        }
        if (!fast_tensor(k_caches[l], &w[6]) || !fast_tensor(v_caches[l], &w[7])) return no;
        // The first block checks everything; the later ones what differs from it (caches and weights).
        params[l] = l == 0
                        ? check_decoder_layer(x, w[6], w[7], slots, tables, lens, pos, cos, sin, w[0], w[1], type[0],
                                              w[2], type[1], w[3], w[4], type[2], w[5], type[3], num_heads,
                                              num_kv_heads, intermediate_size, eps, scale, kv_layout, true, tree_mask)
                        : check_decoder_layer_next(params[0], held[6], x, w[6], w[7], w[0], w[1], type[0], w[2],
                                                   type[1], w[3], w[4], type[2], w[5], type[3]);
      }
      if (plan != nullptr) {  // every block checked: keep it for the next steps
        plan->refs.clear();
        for (size_t l = 0; l < L; ++l) {
          plan->refs.push_back(pybind11::reinterpret_borrow<pybind11::object>(layers[l]));
          plan->refs.push_back(pybind11::reinterpret_borrow<pybind11::object>(k_caches[l]));
          plan->refs.push_back(pybind11::reinterpret_borrow<pybind11::object>(v_caches[l]));
        }
        plan->layouts.assign(held.size(), HeldLayout{});
        plan->storages.clear();
        for (size_t i = 0; i < held.size(); ++i) {
          if (!HeldLayout::of(held[i], &plan->layouts[i])) break;  // not kept (e.g. more than 4 dims)
          plan->storages.push_back(held[i].storage());
        }
        plan->held = held;
        plan->types = std::move(types);
        if (plan->storages.size() == held.size())
          plan->params = params;
        else
          plan->params.clear();
        plan->num_heads = num_heads, plan->num_kv_heads = num_kv_heads, plan->intermediate = intermediate_size;
        plan->eps = eps, plan->scale = scale, plan->kv_layout = kv_layout;
      }
    }
  } catch (const std::exception&) {
    if (plan != nullptr) plan->params.clear();  // the op raises the precise error; nothing is kept
    return no;
  }
  const int64_t B = params[0].B, T = params[0].T, H = params[0].hidden;
  at::Tensor hidden, logits;
  float eps_f = 0.0f;
  if (with_head) {
    const dk::cpu::IeeeDenormals ieee;  // as rms_norm converts eps
    eps_f = static_cast<float>(eps);
    hidden = at::detail::empty_cpu({B, H}, at::kFloat);
    logits = at::detail::empty_cpu({B, head.N}, at::kFloat);
  }
  if (x.numel() != 0) {
    float* xp = x.data_ptr<float>();
    pybind11::gil_scoped_release no_gil;
    const int nt = dk::torch_ops::num_threads();
    for (size_t l = 0; l < L; ++l) dk::cpu::kernels().decoder_layer(xp, params[l], nt);
    if (with_head && B > 0) {
      namespace lp = dk::cpu::layer_profile;
      const bool timed = lp::enabled();
      auto t0 = std::chrono::steady_clock::now();
      float* h = hidden.data_ptr<float>();
      float* y = logits.data_ptr<float>();
      dk::cpu::kernels().rms_norm(xp + (T - 1) * H, B, H, T * H, head.norm.data_ptr<float>(), eps_f, h, H, nt);
      auto t1 = std::chrono::steady_clock::now();
      if (head.w.quantized)
        dk::cpu::kernels().linear_quantized(h, B, H, H, static_cast<const uint8_t*>(head.w.data), head.w.type, head.N,
                                            nullptr, y, head.N, nt);
      else
        dk::cpu::kernels().linear(h, B, H, H, static_cast<const float*>(head.w.data), head.N, H, nullptr, y, head.N,
                                  nt);
      if (timed) {
        auto t2 = std::chrono::steady_clock::now();
        lp::add(lp::kHeadNorm, std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
        lp::add(lp::kProjectHead, std::chrono::duration_cast<std::chrono::nanoseconds>(t2 - t1).count());
      }
    }
  }
  // In-place writes, as the op's Tensor(a!) arguments (inference tensors have no version counter).
  if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
  for (size_t l = 0; l < L; ++l)
    for (int c = 6; c < 8; ++c)
      if (!tensors[8 * l + c].is_inference()) tensors[8 * l + c].unsafeGetTensorImpl()->bump_version();
  if (!with_head) return pybind11::bool_(true);
  if (head.token_ids.defined()) {  // a reduced head: its logits at their tokens, -inf elsewhere
    at::Tensor full = at::detail::empty_cpu({B, head.V}, at::kFloat);
    float* f = full.data_ptr<float>();
    const float* y = logits.data_ptr<float>();
    const int64_t* id = head.token_ids.data_ptr<int64_t>();
    std::fill(f, f + B * head.V, -std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < head.N; ++j) f[b * head.V + id[j]] = y[b * head.N + j];
    logits = std::move(full);
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(logits)));
}

pybind11::object decoder_layers_fast(pybind11::handle x_obj, pybind11::list k_caches, pybind11::list v_caches,
                                     pybind11::handle slot_mapping_obj, pybind11::handle block_tables_obj,
                                     pybind11::handle seq_lens_obj, pybind11::handle positions_obj,
                                     pybind11::handle cos_obj, pybind11::handle sin_obj, pybind11::list layers,
                                     int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size, double eps,
                                     double scale, const std::string& kv_layout, pybind11::handle tree_mask_obj,
                                     pybind11::handle plan_obj, pybind11::handle head_obj) {
  const pybind11::object no = pybind11::bool_(false);
  if (!no_python_modes()) return no;
  at::Tensor x, slots, tables, lens, pos, cos, sin;
  if (!fast_tensor(x_obj, &x) || !fast_tensor(slot_mapping_obj, &slots) || !fast_tensor(block_tables_obj, &tables) ||
      !fast_tensor(seq_lens_obj, &lens) || !fast_tensor(positions_obj, &pos) || !fast_tensor(cos_obj, &cos) ||
      !fast_tensor(sin_obj, &sin))
    return no;
  std::optional<at::Tensor> tree_mask;
  if (!tree_mask_obj.is_none()) {
    at::Tensor m;
    if (!fast_tensor(tree_mask_obj, &m)) return no;
    tree_mask = m;
  }
  DecoderLayersPlan* plan = nullptr;
  if (!fast_plan(plan_obj, &plan)) return no;
  return layer_loop(x, slots, tables, lens, pos, cos, sin, k_caches, v_caches, layers, num_heads, num_kv_heads,
                    intermediate_size, eps, scale, kv_layout, tree_mask, plan, head_obj);
}

// A GGML weight's blocks for an [N, K] matrix of block type `name`: a contiguous uint8 tensor of
// N * K / 32 blocks, K a positive multiple of 32 (the embedding lookups of the fast entries).
// False: anything else.
bool fast_blocks(const at::Tensor& blocks, const std::string& name, int64_t N, int64_t K, dk::cpu::BlockType* type) {
  int64_t bytes = 0;
  if (!block_type_of(name, type, &bytes) || N < 0 || K <= 0 || K % 32) return false;
  return blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.numel() == N * (K / 32) * bytes;
}

// A list of B Python ints (exact int, not bool) in [lo, hi) into out. False: anything else.
bool fast_int_list(pybind11::handle o, int64_t B, int64_t lo, int64_t hi, int64_t* out) {
  if (!PyList_CheckExact(o.ptr()) || PyList_GET_SIZE(o.ptr()) != B) return false;
  for (int64_t b = 0; b < B; ++b) {
    PyObject* v = PyList_GET_ITEM(o.ptr(), b);
    if (!PyLong_CheckExact(v)) return false;
    int overflow = 0;
    const long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow != 0 || (n == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    if (n < lo || n >= hi) return false;
    out[b] = n;
  }
  return true;
}

// One decode step of B sequences (one new token each) with the step's small tensors built
// here instead of in Python: LlamaModel._decode_step. A step that has just streamed the
// model's weights finds the interpreter's and the dispatcher's code and data cold, and each
// small torch op in Python then costs 25-150 microseconds (torch.tensor of one id about 90 on
// the 2-core EPYC). This entry takes the step's numbers as Python ints:
//   tokens: B token ids; starts: B cached lengths (the new token's position); tables: B lists
//   of block ids, each holding the block of position starts[b] (the cache reserved it);
//   embed: (weight, type, N, K), the embedding as layer_weight gives it: a float32 [N, K]
//   tensor ('f32') or a QuantizedWeight's blocks ('q4_1' / 'q8_0').
// It builds the embedding rows (the kernels of LlamaModel._embed: a row copy, or
// dequantize_rows), the slots, positions, lengths and the int64 block table padded with -1
// (what forward_paged builds), then runs layer_loop with the head. `stream`: the quantized
// products stream their weights during the call (forward_paged's switch), restored after.
// Returns the logits [B, V], or False having written nothing (an id outside [0, N), a
// position past its table, anything unusual): the caller then takes forward_paged, which
// raises the precise error. `keepdim`: the logits as [B, 1, V] (the decode loop's shape). The
// logits are inference tensors, as forward_paged's (it runs in torch.inference_mode()).
pybind11::object decode_step_fast(pybind11::list tokens, pybind11::list starts, pybind11::list tables_obj,
                                  int64_t block_size, pybind11::tuple embed, pybind11::list k_caches,
                                  pybind11::list v_caches, pybind11::handle cos_obj, pybind11::handle sin_obj,
                                  pybind11::list layers, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t intermediate_size, double eps, double scale, const std::string& kv_layout,
                                  pybind11::handle plan_obj, pybind11::handle head_obj, bool stream, bool keepdim) {
  const pybind11::object no = pybind11::bool_(false);
  if (!no_python_modes()) return no;
  const c10::InferenceMode inference;  // the tensors it makes are inference tensors, as forward_paged's
  const int64_t B = static_cast<int64_t>(tokens.size());
  if (B == 0 || block_size <= 0 || PyTuple_GET_SIZE(embed.ptr()) != 4 || head_obj.is_none()) return no;
  at::Tensor cos, sin, ew;
  if (!fast_tensor(cos_obj, &cos) || !fast_tensor(sin_obj, &sin)) return no;
  DecoderLayersPlan* plan = nullptr;
  if (!fast_plan(plan_obj, &plan)) return no;
  // The embedding.
  std::string etype;
  PyObject* en = PyTuple_GET_ITEM(embed.ptr(), 2);
  PyObject* ek = PyTuple_GET_ITEM(embed.ptr(), 3);
  if (!fast_tensor(PyTuple_GET_ITEM(embed.ptr(), 0), &ew) || !fast_utf8(PyTuple_GET_ITEM(embed.ptr(), 1), &etype) ||
      !PyLong_CheckExact(en) || !PyLong_CheckExact(ek))
    return no;
  int overflow = 0;
  const int64_t N = PyLong_AsLongLongAndOverflow(en, &overflow);
  if (overflow != 0) return no;
  const int64_t K = PyLong_AsLongLongAndOverflow(ek, &overflow);
  if (overflow != 0 || PyErr_Occurred() || N <= 0 || K <= 0 || N >= (int64_t{1} << 31) || K >= (int64_t{1} << 31)) {
    PyErr_Clear();
    return no;
  }
  dk::cpu::BlockType btype{};
  const bool quantized = etype != "f32";
  if (quantized) {
    if (!fast_blocks(ew, etype, N, K, &btype)) return no;
  } else if (ew.scalar_type() != at::kFloat || ew.dim() != 2 || ew.size(0) != N || ew.size(1) != K ||
             !ew.is_contiguous()) {
    return no;
  }
  // The step's numbers.
  at::Tensor ids = at::detail::empty_cpu({B}, at::kLong);
  at::Tensor pos = at::detail::empty_cpu({B, 1}, at::kLong);
  at::Tensor lens = at::detail::empty_cpu({B}, at::kLong);
  at::Tensor slots = at::detail::empty_cpu({B, 1}, at::kLong);
  int64_t* id = ids.data_ptr<int64_t>();
  int64_t* p = pos.data_ptr<int64_t>();
  if (!fast_int_list(tokens, B, 0, N, id) || !fast_int_list(starts, B, 0, int64_t{1} << 40, p)) return no;
  if (!PyList_CheckExact(tables_obj.ptr()) || PyList_GET_SIZE(tables_obj.ptr()) != B) return no;
  int64_t width = 0;
  for (int64_t b = 0; b < B; ++b) {
    PyObject* t = PyList_GET_ITEM(tables_obj.ptr(), b);
    if (!PyList_CheckExact(t)) return no;
    width = std::max<int64_t>(width, PyList_GET_SIZE(t));
  }
  at::Tensor tables = at::detail::empty_cpu({B, width}, at::kLong);
  int64_t* tb = tables.data_ptr<int64_t>();
  int64_t* ln = lens.data_ptr<int64_t>();
  int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    pybind11::handle t = PyList_GET_ITEM(tables_obj.ptr(), b);
    const int64_t n = PyList_GET_SIZE(t.ptr());
    if (!fast_int_list(t, n, 0, int64_t{1} << 40, tb + b * width)) return no;
    for (int64_t j = n; j < width; ++j) tb[b * width + j] = -1;
    const int64_t blk = p[b] / block_size;
    if (blk >= n) return no;  // the cache did not reserve the new token's block
    sl[b] = tb[b * width + blk] * block_size + p[b] % block_size;
    ln[b] = p[b] + 1;
  }
  at::Tensor x = at::detail::empty_cpu({B, 1, K}, at::kFloat);
  {
    pybind11::gil_scoped_release no_gil;
    float* xp = x.data_ptr<float>();
    if (quantized)
      dk::cpu::kernels().dequantize_rows(ew.data_ptr<uint8_t>(), btype, N, K, id, B, xp, dk::torch_ops::num_threads());
    else
      for (int64_t b = 0; b < B; ++b) std::memcpy(xp + b * K, ew.data_ptr<float>() + id[b] * K, sizeof(float) * K);
  }
  // The weight stream on for the call where forward_paged turns it on (restored after).
  const bool before = stream ? dk::cpu::weight_stream::set(true) : false;
  pybind11::object out;
  try {
    out = layer_loop(x, slots, tables, lens, pos, cos, sin, k_caches, v_caches, layers, num_heads, num_kv_heads,
                     intermediate_size, eps, scale, kv_layout, std::nullopt, plan, head_obj);
  } catch (...) {
    if (stream) dk::cpu::weight_stream::set(before);
    throw;
  }
  if (stream) dk::cpu::weight_stream::set(before);
  if (PyBool_Check(out.ptr())) return no;  // (True cannot come back with a head)
  if (!keepdim) return out;
  const at::Tensor& logits = THPVariable_Unpack(out.ptr());
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(logits.view({B, 1, logits.size(1)})));
}

// QuantizedWeight.dequantize_rows (an embedding lookup on GGML blocks) for plain
// arguments: blocks a contiguous uint8 CPU tensor of N * K / 32 blocks of
// block_type, ids a contiguous int64 CPU tensor of ids in [0, N) (any shape).
// Returns float32 [*ids.shape, K], or None for the Python path (which raises
// for bad ids). One call instead of a dozen small torch ops per decode step.
pybind11::object dequantize_rows_fast(pybind11::handle blocks_obj, const std::string& block_type, int64_t N, int64_t K,
                                      pybind11::handle ids_obj) {
  if (!no_python_modes()) return pybind11::none();
  at::Tensor blocks, ids;
  if (!fast_tensor(blocks_obj, &blocks) || !fast_tensor(ids_obj, &ids)) return pybind11::none();
  dk::cpu::BlockType type;
  if (!fast_blocks(blocks, block_type, N, K, &type)) return pybind11::none();
  if (ids.scalar_type() != at::kLong || !ids.is_contiguous()) return pybind11::none();
  const int64_t R = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    if (id[r] < 0 || id[r] >= N) return pybind11::none();
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  at::Tensor out = at::detail::empty_cpu(sizes, at::kFloat);
  if (R > 0) {
    pybind11::gil_scoped_release no_gil;
    dk::cpu::kernels().dequantize_rows(blocks.data_ptr<uint8_t>(), type, N, K, id, R, out.data_ptr<float>(),
                                       dk::torch_ops::num_threads());
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace

namespace decodekit {
namespace torch_ops {

void add_fast_entries(pybind11::module_& mod) {
  mod.def("_dequantize_rows_fast", &dequantize_rows_fast,
          "QuantizedWeight.dequantize_rows for plain arguments, or None for the Python path.");
  mod.def("_decoder_layers_fast", &decoder_layers_fast,
          "decoder_layer over every block of a model (then the LM head with `head`: the logits); False (nothing "
          "written) for the op's path.",
          pybind11::arg("x"), pybind11::arg("k_caches"), pybind11::arg("v_caches"), pybind11::arg("slot_mapping"),
          pybind11::arg("block_tables"), pybind11::arg("seq_lens"), pybind11::arg("positions"),
          pybind11::arg("cos_table"), pybind11::arg("sin_table"), pybind11::arg("layers"), pybind11::arg("num_heads"),
          pybind11::arg("num_kv_heads"), pybind11::arg("intermediate_size"), pybind11::arg("eps"),
          pybind11::arg("scale"), pybind11::arg("kv_layout"), pybind11::arg("tree_mask") = pybind11::none(),
          pybind11::arg("plan") = pybind11::none(), pybind11::arg("head") = pybind11::none());
  mod.def("_decode_step_fast", &decode_step_fast,
          "One decode step (a token per sequence) from Python ints: the logits, or False (nothing written) for "
          "forward_paged.",
          pybind11::arg("tokens"), pybind11::arg("starts"), pybind11::arg("tables"), pybind11::arg("block_size"),
          pybind11::arg("embed"), pybind11::arg("k_caches"), pybind11::arg("v_caches"), pybind11::arg("cos_table"),
          pybind11::arg("sin_table"), pybind11::arg("layers"), pybind11::arg("num_heads"),
          pybind11::arg("num_kv_heads"), pybind11::arg("intermediate_size"), pybind11::arg("eps"),
          pybind11::arg("scale"), pybind11::arg("kv_layout"), pybind11::arg("plan"), pybind11::arg("head"),
          pybind11::arg("stream"), pybind11::arg("keepdim") = false);
  pybind11::class_<DecoderLayersPlan>(mod, "_DecoderLayersPlan",
                                      "What _decoder_layers_fast checked about a model's blocks on one cache "
                                      "(kept on the cache object; see fast_entries.cpp).")
      .def(pybind11::init<>());
  mod.def("_sample_from_logits_fast", &sample_from_logits_fast,
          "decodekit.sample_from_logits for plain arguments, or None for the full path. as_list: the ids as a "
          "list of ints, and logits [B, 1, V] are taken as [B, V] (the decode loop's plain step).",
          pybind11::arg("logits"), pybind11::arg("temperature"), pybind11::arg("top_k"), pybind11::arg("top_p"),
          pybind11::arg("min_p"), pybind11::arg("seed"), pybind11::arg("offset"), pybind11::arg("deterministic"),
          pybind11::arg("as_list") = false);
  mod.def("_softmax_fast", &softmax_fast, "decodekit.softmax for plain arguments, or None for the full path.");
}

}  // namespace torch_ops
}  // namespace decodekit
