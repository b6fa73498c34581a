// The Python module decodekit._C: importing it runs the op registrations of
// csrc/torch/*.cpp; the module itself reports what it was built with and
// holds the fast entries and the Philox known-answer hooks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/common/isa.h"
#include "cpu/common/thread_pool.h"
#include "cpu/linear.h"
#include "decodekit/philox.h"
#include "decodekit/reduce.h"
#include "torch/threads.h"

namespace dk = decodekit;

namespace decodekit {
namespace torch_ops {
void add_fast_entries(pybind11::module_& mod);  // fast_entries.cpp
}  // namespace torch_ops
}  // namespace decodekit

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "decodekit compiled ops (registered under torch.ops.decodekit)";
  mod.attr("built_with_torch") = DK_TORCH_VERSION;
  // The Philox header as compiled into the kernels, for known-answer tests.
  mod.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const auto r = dk::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return pybind11::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
      },
      "One Philox4x32-10 block: (counter c0..c3, key k0, k1) -> 4 x uint32.");
  mod.def(
      "philox_uniform_double",
      [](uint64_t seed, uint64_t offset, uint32_t stream, uint64_t i) {
        return dk::PhiloxStreamRef{seed, offset, stream}.uniform_double(i);
      },
      "The float64 uniform number i of stream (seed, offset, stream), as the kernels draw it.");
  mod.def(
      "_draw_reference",
      [](const std::vector<float>& weights, double u) {
        double total = 0.0;
        const float* w = weights.data();
        const int64_t i =
            dk::reduce::draw([w](int64_t j) { return w[j]; }, static_cast<int64_t>(weights.size()), u, -1, &total);
        return pybind11::make_tuple(i, total);
      },
      "The scalar reference of the inverse-CDF draw (decodekit/reduce.h) over weights >= 0: (index, total).");
  dk::torch_ops::add_fast_entries(mod);
  // The thread count (validated in python/decodekit/_threads.py).
  mod.def("_set_num_threads", &dk::torch_ops::set_num_threads_setting,
          "Set the CPU kernels' thread count: n >= 1, or 0 to follow torch.get_num_threads().");
  mod.def("_num_threads_setting", &dk::torch_ops::num_threads_setting,
          "decodekit's own thread-count setting: 0 when it follows torch.get_num_threads().");
  mod.def("_num_threads", &dk::torch_ops::num_threads, "The thread count the CPU kernels use now (>= 1).");
  mod.def("_pool_size", &dk::cpu::pool::pool_size, "Worker threads the CPU kernels' pool has started.");
  // The linear kernels' streamed-weights switch (cpu/linear.h, weight_stream): LlamaModel sets it
  // around a forward whose weights exceed the last-level cache.
  mod.def("_weight_stream", &dk::cpu::weight_stream::set,
          "Turn the linear kernels' non-temporal weight prefetch on or off; returns the previous state.");
  mod.def("_last_level_cache_bytes", &dk::cpu::weight_stream::last_level_cache_bytes,
          "The CPU's last-level cache in bytes (sysfs, sysconf; 32 MiB when unknown).");
  // decoder_layer's phase timers (cpu/layers.h, layer_profile), for bench/anchors/e2e/profile_step.py.
  mod.def("_layer_profile", &dk::cpu::layer_profile::set_enabled,
          "Turn decoder_layer's phase timers on or off (either way the counters restart at 0).");
  mod.def(
      "_layer_profile_read",
      [] {
        namespace lp = dk::cpu::layer_profile;
        int64_t ns[lp::kNumPhases], calls = 0;
        lp::read(ns, &calls);
        static const char* names[lp::kNumPhases] = {"norm",         "project_qkv", "project_o", "project_gate_up",
                                                    "project_down", "rope",        "kv_append", "attention",
                                                    "activation",   "residual",    "head_norm", "project_head"};
        pybind11::dict d;
        for (int i = 0; i < lp::kNumPhases; ++i) d[names[i]] = ns[i];
        d["calls"] = calls;
        return d;
      },
      "decoder_layer's phase timers: wall nanoseconds per phase summed over the timed calls, and the calls.");
  mod.def("cpu_isa", &dk::cpu::active_isa,
          "The instruction set the CPU kernels run with: avx512, avx2 or baseline (all give the same bits).");
#ifdef DK_WITH_CUDA
  mod.attr("has_cuda_ops") = true;
#else
  mod.attr("has_cuda_ops") = false;
#endif
}
