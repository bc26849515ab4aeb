// csrc/cuda/step_loops.cuh (the CUDA step loops and their kernels) compiled for the CPU on
// top of emulated_cuda.h, for tests/test_cuda_emulated.py. It exposes the two loops with the
// buffers that layer.cpp gives them on CUDA; the test does the once-per-sequence products itself
// and compares everything with the CPU op. `sms` stands in for the GPU's multiprocessor count,
// which the kernels' cost model takes into account, and set_rows_per_block for
// FUSED_RNN_CUDA_ROWS_PER_BLOCK, which forces a variant. A float16/bfloat16 W_hh (with everything
// else float32) takes the tensor-core kernel, as on the GPU; so does a float32 one with `tf32` (as
// on a GPU while torch.backends.cudnn.allow_tf32 is set).
#include <torch/extension.h>

#include "emulated_cuda.h"
// After the shim: the kernels need its CUDA names.
#include "cuda/persistent_loops.cuh"  // and step_loops.cuh

namespace fused_rnn {
namespace {

int emulated_multiprocessors = 1;

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  emulated_cuda::run_grid(grid, block, [&] { kernel(args); });
}

int emulated_rows_per_block = 0;

int multiprocessor_count() { return emulated_multiprocessors; }

// A block's shared memory on an H100 (227 KB), which bounds the blocks a cooperative launch may
// have with the SM count: so the automatic choice of the persistent kernel is tested with the
// numbers it meets on one.
constexpr size_t kEmulatedSharedBytesPerSm = 227 * 1024;

template <typename Args>
void launch_cooperative(void (*kernel)(Args), dim3 grid, dim3 block, size_t shared_bytes, const Args& args) {
  const long capacity = static_cast<long>(cooperative_capacity(kernel, block, shared_bytes));
  emulated_cuda::run_cooperative(grid, block, shared_bytes, capacity, [&] { kernel(args); });
}

bool capturing_a_graph() { return false; }

template <typename Args>
int64_t cooperative_capacity(void (*)(Args), dim3, size_t shared_bytes) {
  if (shared_bytes > kEmulatedSharedBytesPerSm) return 0;
  return static_cast<int64_t>(emulated_multiprocessors) * static_cast<int64_t>(kEmulatedSharedBytesPerSm / shared_bytes);
}
int forced_rows_per_block() { return emulated_rows_per_block; }

// The cell's kGates and kSaved, named by its id.
template <typename Cell>
struct CellConstants {
  static void run(int64_t& gates, int64_t& saved_per_unit) {
    gates = Cell::kGates;
    saved_per_unit = Cell::kSaved;
  }
};

// What describe_layer (layer.cpp) gives the loops, from W_hh [G*H, P] and h0 [B, P].
LayerShape shape_of(int64_t cell, const std::vector<int64_t>& batch_sizes, const Tensor& w_hh, const Tensor& h0,
                    bool proj) {
  LayerShape s;
  s.cell = static_cast<CellKind>(cell);
  dispatch_cell<CellConstants, float>(s.cell, s.gates, s.saved_per_unit);
  s.T = static_cast<int64_t>(batch_sizes.size());
  s.B = s.T > 0 ? batch_sizes[0] : 0;
  s.I = 0;  // the loops never read it
  s.H = w_hh.size(0) / s.gates;
  s.P = h0.size(1);
  s.proj = proj;
  s.outputs_in_saved = false;
  s.batch_sizes = batch_sizes;
  int64_t rows = 0;
  for (int64_t n : batch_sizes) {
    s.offsets.push_back(rows);
    rows += n;
  }
  s.N = rows;
  return s;
}

Tensor or_undefined(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// NaN where nothing is written: an element a kernel misses shows in the comparison.
Tensor unwritten(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

std::vector<Tensor> forward(int64_t cell, const Tensor& gx, std::vector<int64_t> batch_sizes, bool reverse,
                            const Tensor& h0, const c10::optional<Tensor>& c0, const Tensor& w_hh,
                            const c10::optional<Tensor>& b_hn, const c10::optional<Tensor>& w_hr, bool need_saved,
                            int64_t sms, bool tf32) {
  const LayerShape s = shape_of(cell, batch_sizes, w_hh, h0, w_hr.has_value());
  emulated_multiprocessors = static_cast<int>(sms);
  Tensor y = unwritten({s.N, s.P}, gx.options());
  Tensor h = h0.clone();
  Tensor c = s.cell == CellKind::LSTM ? c0->clone() : Tensor();
  Tensor saved = need_saved ? unwritten({s.N, s.saved_cols()}, gx.options()) : Tensor();
  const Tensor bias_hn = or_undefined(b_hn), w_proj = or_undefined(w_hr);
  if (tf32) {  // float32 W_hh on the tensor cores
    TORCH_CHECK(w_hh.scalar_type() == at::kFloat, "TF32 takes a float32 W_hh");
    dispatch_cell<Tf32TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, bias_hn, w_proj, y, h, c, saved);
  } else if (w_hh.scalar_type() == at::kHalf) {  // the tensor-core kernel: everything else in float32
    dispatch_cell<HalfTensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, bias_hn, w_proj, y, h, c, saved);
  } else if (w_hh.scalar_type() == at::kBFloat16) {
    dispatch_cell<BFloat16TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, bias_hn, w_proj, y, h, c,
                                                        saved);
  } else {
    AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "emulated_forward", [&] {
      dispatch_cell<CudaCoreForwardLoop, scalar_t>(s.cell, s, reverse, gx, w_hh, bias_hn, w_proj, y, h, c, saved);
    });
  }
  return {y, h, c.defined() ? c : at::empty({0}, gx.options()), saved.defined() ? saved : at::empty({0}, gx.options())};
}

// Returns dgx, dgh, dh (at h_0), dc (at c_0) and, with a projection, dh_total.
std::vector<Tensor> backward(int64_t cell, std::vector<int64_t> batch_sizes, bool reverse, const Tensor& w_hh,
                             const c10::optional<Tensor>& w_hr, const Tensor& y, const Tensor& h0,
                             const c10::optional<Tensor>& c0, const Tensor& saved, const c10::optional<Tensor>& dy,
                             const Tensor& dh_n, const c10::optional<Tensor>& dc_n, int64_t sms, bool fuse) {
  const LayerShape s = shape_of(cell, batch_sizes, w_hh, h0, w_hr.has_value());
  emulated_multiprocessors = static_cast<int>(sms);
  const auto opts = y.options();
  const int64_t GH = s.gates * s.H;
  Tensor dh = dh_n.clone();
  Tensor dc = s.cell == CellKind::LSTM ? dc_n->clone() : Tensor();
  Tensor dgx = unwritten({s.N, GH}, opts);
  Tensor dgh = s.cell == CellKind::GRU ? unwritten({s.N, GH}, opts) : dgx;
  Tensor dh_total = s.proj ? unwritten({s.N, s.P}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "emulated_backward", [&] {
    dispatch_cell<CudaCoreBackwardLoop, scalar_t>(s.cell, s, reverse, w_hh, or_undefined(w_hr), y, h0, or_undefined(c0),
                                          saved, or_undefined(dy), dh, dc, dgx, dgh, dh_total, fuse);
  });
  const Tensor none = at::empty({0}, opts);
  return {dgx, dgh, dh, dc.defined() ? dc : none, dh_total.defined() ? dh_total : none};
}

// The rows per block of the variant that a kernel runs for one step of n rows (the forced one,
// else the cost model's pick): "forward" (CUDA cores, in T), "tensor_core" (float16 W_hh) or
// "backward" (fused, both steps with n rows).
template <typename Cell>
struct ChosenRows {
  static void run(const std::string& kernel, int64_t n, int64_t H, int64_t P, int sms, int64_t& rows) {
    using T = typename Cell::scalar_t;
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

// Whether a padded layer (batch B, hidden H, proj_size or 0) takes a persistent kernel on `sms`
// SMs, FUSED_RNN_CUDA_PERSISTENT included: "forward" and "backward" on the CUDA cores
// (persistent_forward_wanted, persistent_backward_wanted; float32 or float64), "float16",
// "bfloat16" and "tf32" the forward on the tensor cores (persistent_tensor_core_wanted).
template <typename Cell>
struct PersistentChoice {
  static void run(const LayerShape& s, const std::string& kernel, bool& chosen) {
    using T = typename Cell::scalar_t;
    if (kernel == "forward") {
      chosen = persistent_forward_wanted<Cell>(s);
    } else if (kernel == "backward") {
      chosen = persistent_backward_wanted<Cell>(s);
    } else if constexpr (std::is_same_v<T, float>) {
      if (kernel == "float16") {
        chosen = persistent_tensor_core_wanted<Cell, __half>(s);
      } else if (kernel == "bfloat16") {
        chosen = persistent_tensor_core_wanted<Cell, __nv_bfloat16>(s);
      } else {
        TORCH_CHECK(kernel == "tf32", "unknown kernel ", kernel);
        chosen = persistent_tensor_core_wanted<Cell, Tf32>(s);
      }
    } else {
      TORCH_CHECK(false, "the tensor cores' cells run in float32");
    }
  }
};

bool persistent_chosen(const std::string& kernel, int64_t cell, int64_t B, int64_t H, int64_t proj, bool float64,
                       int64_t sms) {
  LayerShape s;
  s.cell = static_cast<CellKind>(cell);
  dispatch_cell<CellConstants, float>(s.cell, s.gates, s.saved_per_unit);
  s.T = 1, s.B = B, s.N = B, s.I = 0, s.H = H, s.P = proj ? proj : H, s.proj = proj > 0;
  s.outputs_in_saved = false;
  s.batch_sizes = {B};
  s.offsets = {0};
  emulated_multiprocessors = static_cast<int>(sms);
  bool chosen = false;
  if (float64) {
    dispatch_cell<PersistentChoice, double>(s.cell, s, kernel, chosen);
  } else {
    dispatch_cell<PersistentChoice, float>(s.cell, s, kernel, chosen);
  }
  return chosen;
}

int64_t chosen_rows_per_block(const std::string& kernel, int64_t cell, int64_t n, int64_t H, int64_t P,
                              bool float64, int64_t sms) {
  int64_t rows = 0;
  if (float64) {
    dispatch_cell<ChosenRows, double>(static_cast<CellKind>(cell), kernel, n, H, P, static_cast<int>(sms), rows);
  } else {
    dispatch_cell<ChosenRows, float>(static_cast<CellKind>(cell), kernel, n, H, P, static_cast<int>(sms), rows);
  }
  return rows;
}

}  // namespace
}  // namespace fused_rnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fused_rnn::forward);
  m.def("backward", &fused_rnn::backward);
  m.def("set_blocks_descending", [](bool descending) { emulated_cuda::blocks_descending = descending; });
  m.def("set_rows_per_block", [](int64_t rows) { fused_rnn::emulated_rows_per_block = static_cast<int>(rows); });
  m.def("chosen_rows_per_block", &fused_rnn::chosen_rows_per_block);
  m.def("persistent_chosen", &fused_rnn::persistent_chosen);
}
