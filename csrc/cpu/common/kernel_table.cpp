// The kernel table of one instruction-set build (see isa.h): compiled once per
// instruction set, like the kernels it points to.
#include "cpu/common/isa.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {

#define DK_KERNEL_ENTRY(name, type) &name,
const CpuKernels kTable = {DK_CPU_KERNELS(DK_KERNEL_ENTRY)};
#undef DK_KERNEL_ENTRY

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
