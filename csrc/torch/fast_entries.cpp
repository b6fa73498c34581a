// The C++ fast entries of decodekit.sample_from_logits and decodekit.softmax:
// the common call checked here and run on the CPU kernel directly, bypassing the
// dispatcher (see the comment below).
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <limits>
#include <memory>

#include "cpu/common/fpenv.h"
#include "cpu/common/isa.h"
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

// The logits of a fast entry: an exact, plain CPU tensor [B >= 1, V] of a
// kernel dtype with contiguous rows, no torch function or dispatch mode
// active, and deterministic a bool. False: the caller takes the full path.
bool fast_logits(pybind11::handle logits_obj, pybind11::handle deterministic, dk::LogitsView* view) {
  if (!THPVariable_CheckExact(logits_obj.ptr())) return false;
  if (deterministic.ptr() != Py_True && deterministic.ptr() != Py_False) return false;
  if (at::impl::PythonTorchFunctionTLS::stack_len() > 0 || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      c10::impl::tls_local_dispatch_key_set().included_.has_any(c10::DispatchKeySet(
          {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode})))
    return false;  // a torch.func transform is active
  const at::Tensor& logits = THPVariable_Unpack(logits_obj.ptr());
  if (!plain_cpu_tensor(logits) || logits.requires_grad() || logits.dim() != 2) return false;
  const int64_t B = logits.size(0), V = logits.size(1);
  dk::ScalarKind kind;
  if (!kind_of(logits.scalar_type(), &kind)) return false;
  if (B == 0 || V == 0 || V >= (int64_t{1} << 31) || (logits.stride(1) != 1 && V != 1)) return false;
  *view = dk::LogitsView{logits.data_ptr(), kind, B, V, logits.stride(0), V};
  return true;
}

constexpr double kFastFltMax = 3.4028234663852886e38, kFastTiny = 1.1754943508222875e-38;

// A plain-number temperature the full path would take as it is.
bool fast_temperature_ok(double t) { return t >= 0.0 && t <= kFastFltMax && !(t > 0.0 && t < kFastTiny); }

pybind11::object sample_from_logits_fast(pybind11::handle logits_obj, pybind11::handle temperature,
                                         pybind11::handle top_k, pybind11::handle top_p, pybind11::handle min_p,
                                         pybind11::handle seed, pybind11::handle offset,
                                         pybind11::handle deterministic) {
  dk::LogitsView view;
  if (!fast_logits(logits_obj, deterministic, &view)) return pybind11::none();
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

}  // namespace

namespace decodekit {
namespace torch_ops {

void add_fast_entries(pybind11::module_& mod) {
  mod.def("_sample_from_logits_fast", &sample_from_logits_fast,
          "decodekit.sample_from_logits for plain arguments, or None for the full path.");
  mod.def("_softmax_fast", &softmax_fast, "decodekit.softmax for plain arguments, or None for the full path.");
}

}  // namespace torch_ops
}  // namespace decodekit
