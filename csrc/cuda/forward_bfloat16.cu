// The forward step loop for a bfloat16 W_hh (tensor cores, float32 state), every cell.
#include "gpu_loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_bfloat16) {
  dispatch_cell<BFloat16TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

}  // namespace fused_rnn
