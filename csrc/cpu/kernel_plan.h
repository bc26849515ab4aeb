// Which kernels run a layer call on the CPU: one function decides (plan_cpu), from the call's cell,
// dtype and shape, what this CPU has (cpu_features.h) and the user's overrides (csrc/overrides.h),
// and the loops follow the plan it returns. `python -m fused_rnn` prints it for a few shapes, and
// fused_rnn.cpu_plan(...) for any.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "../layer.h"

namespace fused_rnn {
namespace cpu {

// The kernels a product can take.
enum class Kernel {
  kNone,           // not computed (dX of a layer whose input needs no gradient)
  kBlas,           // torch's BLAS (blas.h): double, complex, the AVX2 build's x·W_ihᵀ and dW, projections
  kVecTiles,       // the panel tiles over at::vec (vec_tiles.h): 8 floats or 4 doubles with AVX2, complex one by one
  kAvx512Tiles,    // the float32 panel tiles on AVX-512 (wide_float.h)
  kAvx512RowDots,  // float32, a batch of one: dot products on W_hh's rows as they are (wide_float.h)
  kAmx,            // float32 on AMX, split into three bfloat16s (amx_float.h)
  kInt8Scalar,     // the int8 products (quantized_cpu.cpp): portable,
  kInt8Avx2,       //   AVX2,
  kInt8Vnni,       //   AVX512-VNNI
};
const char* kernel_name(Kernel k);

enum class Pass { kForward, kBackward, kInt8Forward };

struct CpuPlan {
  // forward: h_{t-1}·W_hhᵀ; backward: dG_t·W_hh.
  Kernel steps = Kernel::kVecTiles;
  // forward: x·W_ihᵀ; backward: dX = dG·W_ih.
  Kernel input = Kernel::kBlas;
  // backward: dW_ih and dW_hh (+)= dGᵀ·[x, h_{t-1}].
  Kernel weight_grads = Kernel::kNone;
  // The cells' math on AVX-512, 16-64 float32 units a call (WideMathOf), else at::vec's width.
  bool wide_cells = false;

  // The AVX-512 tiles' panels (16 floats wide) for the steps' products: packing and geometry.
  bool wide_panels() const {
    return steps == Kernel::kAvx512Tiles || steps == Kernel::kAvx512RowDots || steps == Kernel::kAmx;
  }
  // (name, kernel) per product, for printing.
  std::vector<std::pair<std::string, std::string>> describe(Pass pass) const;
};

// The plan of one call. need_input_grad: the backward computes dX.
CpuPlan plan_cpu(Pass pass, const LayerShape& s, at::ScalarType dtype, bool need_input_grad = true);

}  // namespace cpu
}  // namespace fused_rnn
