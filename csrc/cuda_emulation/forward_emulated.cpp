// csrc/cuda/forward.cu compiled for the CPU over the emulation (built with FUSED_RNN_EMULATED_CUDA,
// which makes loops.cuh take device_emulated.h), and the forward's per-step variant of the cost model.
#include "../cuda/forward.cu"

namespace fused_rnn {
namespace {

template <typename Cell>
struct ChosenRows {
  static void run(const std::string& kernel, int64_t n, int64_t H, int64_t P, int64_t& rows) {
    using T = typename Cell::scalar_t;
    const int sms = device::multiprocessor_count();
    if (kernel == "forward") {
      ForwardArgs<T, T> a{};
      a.n = n, a.H = H, a.P = P;
      rows = kCudaCoreCosts<Cell::kGates>[cuda_core_forward_variant<Cell>(a, sms)].rows_per_block;
    } else if (kernel == "tensor_core") {
      if constexpr (std::is_same_v<T, float>) {
        ForwardArgs<float, __half> a{};
        a.n = n, a.H = H, a.P = P;
        rows = kTensorCoreCosts<__half, Cell::kGates>[tensor_core_forward_variant<Cell, __half>(a, sms)].rows_per_block;
      }
    } else {
      TORCH_CHECK(kernel == "backward", "unknown kernel ", kernel);
      FusedBackwardArgs<T> a{};
      a.cell.n = n, a.rows_before = n, a.cell.H = H;
      rows = kCudaCoreCosts<1>[fused_backward_variant<Cell>(a, sms)].rows_per_block;
    }
  }
};

}  // namespace

int64_t chosen_rows_per_block(const std::string& kernel, CellKind cell, int64_t n, int64_t H, int64_t P,
                              bool float64) {
  int64_t rows = 0;
  if (float64) {
    dispatch_cell<ChosenRows, double>(cell, kernel, n, H, P, rows);
  } else {
    dispatch_cell<ChosenRows, float>(cell, kernel, n, H, P, rows);
  }
  return rows;
}

}  // namespace fused_rnn
