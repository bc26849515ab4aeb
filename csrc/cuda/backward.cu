// The backward step loops of step_loops.cuh and persistent_loops.cuh, every cell, float32 and
// float64 (the half types reach them as float32). The forward's are in forward.cu, which ninja
// builds in parallel with this file.
#include "loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {
namespace {

template <typename Cell>
struct PersistentBackwardChoice {
  static void run(const LayerShape& s, bool& chosen) { chosen = persistent_backward_wanted<Cell>(s); }
};

}  // namespace

bool persistent_backward_chosen(cuda::Recurrent recurrent, const LayerShape& s) {
  bool chosen = false;
  if (recurrent == cuda::Recurrent::kDouble) {
    dispatch_cell<PersistentBackwardChoice, double>(s.cell, s, chosen);
  } else {
    dispatch_cell<PersistentBackwardChoice, float>(s.cell, s, chosen);
  }
  return chosen;
}

FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_float) {
  dispatch_cell<CudaCoreBackwardLoop, float>(s.cell, s, reverse, w_hh_conj, w_hr_conj, variants,
                                             outputs, h0, c0, saved, dy, dh, dc, dgx, dgh, dh_total, fuse, persistent);
}

FUSED_RNN_DECLARE_BACKWARD_LOOP(backward_loop_cuda_double) {
  dispatch_cell<CudaCoreBackwardLoop, double>(s.cell, s, reverse, w_hh_conj, w_hr_conj, variants,
                                              outputs, h0, c0, saved, dy, dh, dc, dgx, dgh, dh_total, fuse, persistent);
}

}  // namespace fused_rnn
