// Which kernels run a layer call on the GPU: one function decides (plan_cuda, ops_cuda.cpp), from
// the dtype, the GPU (compute capability, TF32 flags, what fits on its multiprocessors), the shape
// and the overrides (csrc/overrides.h), and the CUDA half follows the plan it returns. What the plan
// leaves to the loops is the per-step variant of the step kernels (rows per block), which depends
// on each step's rows: the cost model's pick (choose_variant, step_loops.cuh) or the
// cuda_rows_per_block override.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "../layer.h"

namespace fused_rnn {
namespace cuda {

// The recurrent product's operands, which name the step loops (loops_by_dtype.h): float32 and
// float64 on the CUDA cores; float16, bfloat16 and TF32 (float32 in TF32) on the tensor cores.
enum class Recurrent { kFloat, kDouble, kHalf, kBFloat16, kTf32 };
const char* recurrent_name(Recurrent r);

struct CudaPlan {
  at::ScalarType products = at::kFloat;  // cuBLAS's operands (x·W_ihᵀ, dX, dW): compute type, or the half type
  Recurrent recurrent = Recurrent::kFloat;  // h·W_hhᵀ's (forward) or dG·W_hh's (backward) operands
  bool fused_backward = false;  // backward: one launch a step (else the cell kernel, then cuBLAS)
  bool persistent = false;      // one cooperative launch for the whole sequence
  // (name, choice) per decision, for printing.
  std::vector<std::pair<std::string, std::string>> describe(bool backward) const;
};

// The plan of one call of compute dtype `dtype` (the caller's; half types compute in float32) on
// `device`; backward: the layer's backward.
CudaPlan plan_cuda(bool backward, const LayerShape& s, at::ScalarType dtype, const at::Device& device);

}  // namespace cuda
}  // namespace fused_rnn
