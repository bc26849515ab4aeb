// The forward step loops, every cell and dtype: float32 and float64 on the CUDA cores, float16 and
// bfloat16 W_hh on the tensor cores (float32 state), and float32 there too as TF32. One translation
// unit for the forward and one for the backward (backward.cu), which ninja builds in parallel; no
// finer: every .cu that includes ATen.h pays a large fixed cost before any kernel, which a split per
// dtype paid six times over (bench/NOTES.md, "Measurements behind csrc's choices").
#include "loops.cuh"
#include "loops_by_dtype.h"

namespace fused_rnn {
namespace {

template <typename Cell>
struct PersistentForwardChoice {
  static void run(cuda::Recurrent recurrent, const LayerShape& s, bool& chosen) {
    if constexpr (std::is_same_v<typename Cell::scalar_t, float>) {
      switch (recurrent) {
        case cuda::Recurrent::kHalf: chosen = persistent_tensor_core_wanted<Cell, __half>(s); return;
        case cuda::Recurrent::kBFloat16: chosen = persistent_tensor_core_wanted<Cell, __nv_bfloat16>(s); return;
        case cuda::Recurrent::kTf32: chosen = persistent_tensor_core_wanted<Cell, Tf32>(s); return;
        default: break;
      }
    }
    chosen = persistent_forward_wanted<Cell>(s);
  }
};

}  // namespace

bool persistent_forward_chosen(cuda::Recurrent recurrent, const LayerShape& s) {
  bool chosen = false;
  if (recurrent == cuda::Recurrent::kDouble) {
    dispatch_cell<PersistentForwardChoice, double>(s.cell, recurrent, s, chosen);
  } else {
    dispatch_cell<PersistentForwardChoice, float>(s.cell, recurrent, s, chosen);
  }
  return chosen;
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_float) {
  dispatch_cell<CudaCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, variants, y, h,
                                            c, saved, persistent);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_double) {
  dispatch_cell<CudaCoreForwardLoop, double>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, variants, y, h,
                                             c, saved, persistent);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_half) {
  dispatch_cell<HalfTensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, variants,
                                                  y, h, c, saved, persistent);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_bfloat16) {
  dispatch_cell<BFloat16TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, variants, y, h, c,
                                                      saved, persistent);
}

FUSED_RNN_DECLARE_FORWARD_LOOP(forward_loop_cuda_tf32) {
  dispatch_cell<Tf32TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, variants,
                                                  y, h, c, saved, persistent);
}

}  // namespace fused_rnn
