// Compiled once per ISA (hatch_build.py passes -DDSK_ISA=<name> and that ISA's -m flags); each copy
// exports its KernelTable, and dispatch.cpp picks one at run time from CPUID.
#include "common.h"
#include "optim_kernels.h"
#include "quant_kernels.h"

#ifndef DSK_ISA
#error "DSK_ISA must be defined (scalar, avx2 or avx512)"
#endif
#define DSK_STR2(x) #x
#define DSK_STR(x) DSK_STR2(x)
#define DSK_CAT2(a, b) a##b
#define DSK_CAT(a, b) DSK_CAT2(a, b)

namespace dsk {
namespace DSK_ISA {
void adam_entry(const AdamArgs& a) { dispatch_types<AdamK>(a); }
void adagrad_entry(const AdagradArgs& a) { dispatch_types<AdagradK>(a); }
void lion_entry(const LionArgs& a) { dispatch_types<LionK>(a); }
}  // namespace DSK_ISA

const KernelTable& DSK_CAT(table_, DSK_ISA)() {
  static const KernelTable table{DSK_STR(DSK_ISA), DSK_ISA::adam_entry, DSK_ISA::adagrad_entry,
                                 DSK_ISA::lion_entry, DSK_ISA::quantize_any, DSK_ISA::dequantize_any,
                                 DSK_ISA::qmatmul_any, DSK_ISA::triad};
  return table;
}
}  // namespace dsk
