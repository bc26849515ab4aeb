// The float64 backward step loop, every cell.
#include "gpu_loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {

FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_double) {
  dispatch_cell<BackwardLoop, double>(s.cell, s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh, dc, dgx,
                                      dgh, dh_total, fuse);
}

}  // namespace fused_rnn
