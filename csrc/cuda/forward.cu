// The forward step loops, every cell and dtype: float32 and float64 on the CUDA cores, float16 and
// bfloat16 W_hh on the tensor cores (float32 state), and float32 there too as TF32. One translation
// unit for the forward and one for the backward (backward.cu), which ninja builds in parallel; no
// finer: on the 2-core VM a .cu that includes ATen.h costs about 55 s for two architectures before
// any kernel (measured with an empty one), which a split per dtype paid six times over (353 s of
// build instead of 165 s).
#include "loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_float) {
  dispatch_cell<CudaCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_double) {
  dispatch_cell<CudaCoreForwardLoop, double>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_half) {
  dispatch_cell<HalfTensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_bfloat16) {
  dispatch_cell<BFloat16TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_tf32) {
  dispatch_cell<Tf32TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

}  // namespace fused_rnn
