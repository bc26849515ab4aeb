// csrc/cuda/backward.cu compiled for the CPU over the emulation (built with
// FUSED_RNN_EMULATED_CUDA, which makes loops.cuh take device_emulated.h), and the backward's choice
// of the persistent kernel.
#include "../cuda/backward.cu"

namespace fused_rnn {
namespace {

template <typename Cell>
struct PersistentBackwardChoice {
  static void run(const LayerShape& s, bool& chosen) { chosen = persistent_backward_wanted<Cell>(s); }
};

}  // namespace

bool persistent_backward_chosen(const LayerShape& s, bool float64) {
  bool chosen = false;
  if (float64) {
    dispatch_cell<PersistentBackwardChoice, double>(s.cell, s, chosen);
  } else {
    dispatch_cell<PersistentBackwardChoice, float>(s.cell, s, chosen);
  }
  return chosen;
}

}  // namespace fused_rnn
