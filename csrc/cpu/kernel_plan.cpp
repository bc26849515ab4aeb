// plan_cpu: the one place that decides which kernels run a layer call on the CPU (kernel_plan.h).
#include "kernel_plan.h"

#include "../overrides.h"
#include "cpu_features.h"

namespace fused_rnn {
namespace cpu {

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::kNone: return "none";
    case Kernel::kBlas: return "BLAS";
    case Kernel::kVecTiles: return cpu_features().avx2_build ? "AVX2 tiles" : "portable tiles";
    case Kernel::kAvx512Tiles: return "AVX-512 tiles";
    case Kernel::kAvx512RowDots: return "AVX-512 row dots";
    case Kernel::kAmx: return "AMX";
    case Kernel::kInt8Scalar: return "int8 scalar";
    case Kernel::kInt8Avx2: return "int8 AVX2";
    case Kernel::kInt8Vnni: return "int8 AVX512-VNNI";
  }
  return "?";
}

std::vector<std::pair<std::string, std::string>> CpuPlan::describe(Pass pass) const {
  std::vector<std::pair<std::string, std::string>> out;
  const char* cells = wide_cells ? "AVX-512 (16 floats)" : "at::vec";
  switch (pass) {
    case Pass::kForward:
      out = {{"x·W_ihᵀ", kernel_name(input)}, {"h·W_hhᵀ", kernel_name(steps)}, {"cells", cells}};
      break;
    case Pass::kBackward:
      out = {{"dG·W_hh", kernel_name(steps)}, {"dX", kernel_name(input)}, {"dW", kernel_name(weight_grads)},
             {"cells", cells}};
      break;
    case Pass::kInt8Forward:
      out = {{"products", kernel_name(steps)}, {"cells", cells}};
      break;
  }
  return out;
}

CpuPlan plan_cpu(Pass pass, const LayerShape& s, at::ScalarType dtype, bool need_input_grad) {
  const CpuFeatures& cpu = cpu_features();
  const int64_t float_kernel = override_value(Override::kFloatKernel);
  // float32 on AVX-512 (wide_float.h), unless the AVX2 tiles are asked for; with AMX as well
  // where the CPU has it, unless the AVX-512 tiles are asked for.
  const bool wide_cpu = cpu.avx512 && float_kernel != kFloatAvx2;
  const bool wide = dtype == at::kFloat && wide_cpu;
  const bool amx = wide && (float_kernel == kFloatAuto || float_kernel == kFloatAmx) && amx_granted();
  // The weight gradients on the AVX-512 tiles, or on BLAS: on AMD, MKL's sgemm runs its AVX2 path
  // and the tiles are faster; on Intel it runs AVX-512 kernels that are faster than the tiles
  // (bench/NOTES.md has the figures).
  const int64_t chunk_gemm = override_value(Override::kChunkGemm);
  const bool tiled_gradients = chunk_gemm == kChunkGemmTiles || (chunk_gemm == kChunkGemmAuto && !cpu.intel);
  // AMX's steps from this many rows: below, a tile of 16 rows is mostly padding, and the split
  // W_hh's 6 bytes a weight stream from memory where the panels' 4 did.
  const bool amx_steps = amx && s.B >= override_value(Override::kAmxStepRows);

  CpuPlan plan;
  plan.wide_cells = wide_cpu && cpu.avx512_exp && (dtype == at::kFloat || pass == Pass::kInt8Forward);
  switch (pass) {
    case Pass::kForward: {
      // A batch of one reads each weight once a step: dot products on W_hh's rows as they are,
      // with no panels to pack (16 MB at H = 1024, as much time as 4 steps).
      const bool row_dots = wide && s.B == 1;
      plan.steps = row_dots    ? Kernel::kAvx512RowDots
                   : amx_steps ? Kernel::kAmx
                   : wide      ? Kernel::kAvx512Tiles
                               : Kernel::kVecTiles;
      // x·W_ihᵀ on the tiles, or on AMX; at a batch of one on BLAS where BLAS is as fast (Intel),
      // since MKL does not pack W_ih for every call the way the tiles must.
      const bool tiled_projection = wide && (!row_dots || tiled_gradients);
      plan.input = tiled_projection && amx && s.I > 0 ? Kernel::kAmx
                   : tiled_projection                 ? Kernel::kAvx512Tiles
                                                      : Kernel::kBlas;
      break;
    }
    case Pass::kBackward:
      plan.steps = amx_steps ? Kernel::kAmx : wide ? Kernel::kAvx512Tiles : Kernel::kVecTiles;
      plan.input = !need_input_grad   ? Kernel::kNone
                   : amx && s.I > 0 ? Kernel::kAmx
                   : wide           ? Kernel::kAvx512Tiles
                                    : Kernel::kBlas;
      plan.weight_grads = wide && tiled_gradients ? Kernel::kAvx512Tiles : Kernel::kBlas;
      break;
    case Pass::kInt8Forward: {
      const int64_t int8 = override_value(Override::kInt8Kernel);
      plan.steps = !cpu.avx2_build || int8 == kInt8Scalar                   ? Kernel::kInt8Scalar
                   : cpu.vnni && (int8 == kInt8Auto || int8 == kInt8Vnni) ? Kernel::kInt8Vnni
                                                                          : Kernel::kInt8Avx2;
      plan.input = plan.steps;
      break;
    }
  }
  return plan;
}

}  // namespace cpu
}  // namespace fused_rnn
