// The forward step loop for a float16 W_hh (tensor cores, float32 state), every cell.
#include "gpu_loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_half) {
  dispatch_cell<HalfTensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

}  // namespace fused_rnn
