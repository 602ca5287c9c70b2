// Picks the kernel table at run time: the widest ISA this CPU supports, unless DS_KERNELS_ISA
// (or set_isa) asks for a narrower one. Compiled for baseline x86-64, so it runs anywhere.
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"

namespace dsk {

#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && cpu_has_avx2();
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

namespace {
const KernelTable* best() {
#if defined(DSK_HAVE_X86_PATHS)
  if (cpu_has_avx512()) return &table_avx512();
  if (cpu_has_avx2()) return &table_avx2();
#endif
  return &table_scalar();
}
std::atomic<const KernelTable*> g_active{nullptr};
}  // namespace

const KernelTable& active_table() {
  const KernelTable* t = g_active.load();
  if (!t) {
    t = best();
    g_active.store(t);
  }
  return *t;
}

const char* active_isa() { return active_table().name; }

void set_isa(const char* name) {
  std::string n(name);
  if (n == "auto") { g_active.store(best()); return; }
  if (n == "scalar") { g_active.store(&table_scalar()); return; }
#if defined(DSK_HAVE_X86_PATHS)
  if (n == "avx2" || n == "avx512") {
    bool ok = n == "avx2" ? cpu_has_avx2() : cpu_has_avx512();
    if (!ok) throw std::runtime_error("ISA '" + n + "' requested (DS_KERNELS_ISA/set_isa) but this CPU does not support it");
    g_active.store(n == "avx2" ? &table_avx2() : &table_avx512());
    return;
  }
#endif
  throw std::runtime_error("unknown or unbuilt ISA '" + n + "'; choose auto, scalar" +
#if defined(DSK_HAVE_X86_PATHS)
                           std::string(", avx2, avx512")
#else
                           std::string()
#endif
  );
}

}  // namespace dsk
