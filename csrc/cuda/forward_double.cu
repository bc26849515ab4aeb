// The float64 forward step loop (CUDA cores), every cell.
#include "gpu_loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_double) {
  dispatch_cell<CudaCoreForwardLoop, double>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
}

}  // namespace fused_rnn
