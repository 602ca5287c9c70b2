// Shared definitions of the CPU kernels: element types, argument structs and the per-ISA table.
// Framework-free on purpose: raw pointers and sizes only, so one build serves every torch version.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dsk {

// Element type codes; keep in sync with ds_kernels/_checks.py DTYPE_CODES.
enum DType : int { kNone = -1, kF32 = 0, kBF16 = 1, kF16 = 2 };

// Derived scalars (1 - beta, 1 - lr * wd, ...) are computed in double by the caller and rounded once,
// as the references do, so the compiled and reference results agree to the last bits.
struct AdamArgs {
  float* param; const void* grad; int grad_dtype;
  void* exp_avg; void* exp_avg_sq; int state_dtype;  // states fp32, or bf16 (half the state traffic)
  void* out_lowp; int out_dtype; int64_t n;
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay; bool adamw_mode;
  float step_size;     // lr / (1 - beta1^t), or lr without bias correction
  float bc2_rsqrt;     // 1 / sqrt(1 - beta2^t), or 1
  int threads;
};

struct AdagradArgs {
  float* param; const void* grad; int grad_dtype; float* exp_avg_sq;
  void* out_lowp; int out_dtype; int64_t n;
  float lr, eps, weight_decay; int threads;
};

struct LionArgs {
  float* param; const void* grad; int grad_dtype; float* exp_avg;
  void* out_lowp; int out_dtype; int64_t n;
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay; int threads;
};

struct QuantArgs {
  const void* x; int x_dtype; int64_t n_groups; int64_t group_size; int bits; bool symmetric;
  void* q; float* scale; float* zero_point; int threads;  // zero_point null when symmetric
};

struct DequantArgs {
  const void* q; int bits; const float* scale; const float* zero_point; int64_t n_groups;
  int64_t group_size; void* out; int out_dtype; int threads;
};

struct QMatmulArgs {
  const float* x; int64_t m, k;  // x: [m, k] fp32
  const void* q; int bits; const float* scale; const float* zero_point;  // W: [n, k], groups along k
  int64_t n, group_size;
  const float* bias;  // [n] or null
  float* out;         // [m, n] fp32
  int threads;
};

struct TriadArgs {  // a = b + s * c: the memory-bandwidth yardstick for the benchmarks
  float* a; const float* b; const float* c; float s; int64_t n; int threads;
};

struct KernelTable {
  const char* name;
  void (*adam)(const AdamArgs&);
  void (*adagrad)(const AdagradArgs&);
  void (*lion)(const LionArgs&);
  void (*quantize)(const QuantArgs&);
  void (*dequantize)(const DequantArgs&);
  void (*qmatmul)(const QMatmulArgs&);
  void (*triad)(const TriadArgs&);
};

const KernelTable& table_scalar();
const KernelTable& table_avx2();
const KernelTable& table_avx512();

// Runtime dispatch (dispatch.cpp).
const KernelTable& active_table();
const char* active_isa();
void set_isa(const char* name);  // "auto", "avx512", "avx2", "scalar"; throws std::runtime_error
bool cpu_has_avx2();
bool cpu_has_avx512();

}  // namespace dsk
