// What this CPU (and this build) can run, detected once per process: the facts the CPU kernel plan
// (kernel_plan.h) and the overrides' checks (csrc/overrides.cpp) decide from. AMX is asked of the
// kernel only where the plan would take it (amx_granted, amx_float.h): the grant enlarges this
// process's signal frames.
#pragma once

#include "amx_float.h"
#include "vec_math.h"

namespace fused_rnn {
namespace cpu {

struct CpuFeatures {
  bool avx2_build = false;  // compiled with AVX2+FMA (setup.py), the AVX2 tiles' and at::vec's width
  bool avx512 = false;      // AVX-512F: wide_float.h's tiles
  bool avx512_exp = false;  // torch's SLEEF has its AVX-512 exp: the cells on 16-float vectors (WideMathOf)
  bool vnni = false;        // AVX512-VNNI and AVX512-BW: the int8 products' best kernel
  bool intel = false;       // MKL's sgemm runs its AVX-512 kernels here (see kernel_plan.cpp)
};

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__AVX2__)
    f.avx2_build = true;
#endif
#if defined(__x86_64__)
    f.avx512 = __builtin_cpu_supports("avx512f");
    f.avx512_exp = f.avx512 && Sleef_expf16_u10 != nullptr;
    f.vnni = f.avx2_build && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
    f.intel = __builtin_cpu_is("intel");
#endif
    return f;
  }();
  return features;
}

}  // namespace cpu
}  // namespace fused_rnn
