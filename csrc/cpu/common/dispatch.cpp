// Run-time choice of the instruction set for the CPU kernels. Each kernel file
// is compiled once per instruction set (CMakeLists.txt) and fills a kernel
// table (isa.h); this file picks the table of the build the CPU supports. DECODEKIT_CPU_ISA=avx2 (or
// avx512, baseline) forces one, e.g. to check that every build gives the same
// bits; a value the CPU cannot run falls back to the best supported one.
#include <cstdlib>
#include <cstring>

#include "cpu/common/isa.h"

namespace decodekit {
namespace cpu {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && defined(DK_MULTI_ISA)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("f16c");
    case Isa::kBaseline:
      return true;
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa choose() {
  const char* env = std::getenv("DECODEKIT_CPU_ISA");
  if (env) {
    if (!std::strcmp(env, "avx512") && cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
    if (!std::strcmp(env, "avx2") && cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
    if (!std::strcmp(env, "baseline")) return Isa::kBaseline;
  }
  if (cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kBaseline;
}

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

}  // namespace

const char* active_isa() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      return "baseline";
  }
  return "baseline";
}

const CpuKernels& kernels() {
#if defined(DK_MULTI_ISA)
  static const CpuKernels* const table = isa() == Isa::kAvx512 ? &avx512::kTable
                                         : isa() == Isa::kAvx2 ? &avx2::kTable
                                                               : &baseline::kTable;
  return *table;
#else
  return baseline::kTable;
#endif
}

}  // namespace cpu
}  // namespace decodekit
