// The CUDA half of the ops fused_rnn::layer_forward and fused_rnn::layer_backward, host code: after
// the contract's checks (layer.h), the choices (the operands' types, TF32, the step loop by dtype)
// and the once-per-sequence work around the step loops of step_loops.cuh and persistent_loops.cuh:
// the input projection with the folded biases before the walk; the products of the gate gradients
// (dX, dW_ih, dW_hh) and their sums after it. Written against device.h and ATen only, so that the
// CPU emulation runs this very file on CPU tensors (fused_rnn.testing.emulate_cuda()).
//
// dtypes: float32 (its recurrent product on the tensor cores in TF32 where cuDNN's would be), float64,
// and float16 / bfloat16 computed in float32 with half operands for the products; complex is refused.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdlib>
#include <string>

#include "../layer.h"
#include "../overrides.h"
#include "device.h"
#include "loops_by_dtype.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

// The tensor-core kernels (mma.sync with float16, bfloat16 and TF32) need compute capability 8.0.
bool tensor_cores_take_half_types(const at::Device& d) { return device::compute_capability(d) >= 80; }

// float32's recurrent product on the tensor cores in TF32 where cuDNN's RNNs would use it: while
// torch.backends.cudnn.allow_tf32 is set (its default; from torch 2.9 also
// torch.backends.cudnn.rnn.fp32_precision = "tf32"), on compute capability 8.0 and up. The input
// projection is cuBLAS's, which follows torch.backends.cuda.matmul.allow_tf32 (off by default).
// The backward stays on the CUDA cores in float32.
bool tf32_as_cudnn_would(const at::Device& d) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  const bool allowed = at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
#else
  const bool allowed = at::globalContext().allowTF32CuDNN();
#endif
  return allowed && tensor_cores_take_half_types(d);
}

// Gx = x·W_ihᵀ + the folded bias, in the type the op computes in: half operands accumulate and
// come out in float32.
Tensor input_projection(const Tensor& x, const Tensor& w_ih, const Tensor& bias) {
  if (computes_in_float(x)) {
    Tensor gx = device::product_in_float(x, w_ih.t());
    return bias.defined() ? gx.add_(bias) : gx;
  }
  return bias.defined() ? at::addmm(bias, x, w_ih.t()) : at::mm(x, w_ih.t());
}

// h_{t-1} of every row, [N, P], copied from the outputs and h_0 run by run (device to device, so
// that a CUDA graph can capture it): the right factor of dW_hh in one GEMM. The same for LSTM's
// c_{t-1} [N, H] from saved's c_t and c_0 (the peepholes' gradient).
Tensor previous_outputs(const LayerShape& s, bool reverse, const Tensor& outputs, const Tensor& h0) {
  Tensor h_prev = at::empty({s.N, outputs.size(1)}, outputs.options());
  for (const PreviousRun& run : previous_runs(s, reverse)) {
    h_prev.narrow(0, run.row, run.rows).copy_((run.from_h0 ? h0 : outputs).narrow(0, run.source, run.rows));
  }
  return h_prev;
}

// The forward step loop the plan names.
void forward_loop(const cuda::CudaPlan& plan, const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh,
                  const Tensor& b_hn, const Tensor& w_hr, const Variants& variants, Tensor& y, Tensor& h, Tensor& c,
                  Tensor& saved) {
  using cuda::Recurrent;
  const auto loop = plan.recurrent == Recurrent::kHalf       ? &forward_loop_cuda_half
                    : plan.recurrent == Recurrent::kBFloat16 ? &forward_loop_cuda_bfloat16
                    : plan.recurrent == Recurrent::kTf32     ? &forward_loop_cuda_tf32
                    : plan.recurrent == Recurrent::kDouble   ? &forward_loop_cuda_double
                                                             : &forward_loop_cuda_float;
  const at::ScalarType state_type = plan.recurrent == Recurrent::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType weight_type = plan.recurrent == Recurrent::kHalf       ? at::kHalf
                                     : plan.recurrent == Recurrent::kBFloat16 ? at::kBFloat16
                                                                              : state_type;
  TORCH_CHECK(gx.scalar_type() == state_type && w_hh.scalar_type() == weight_type, "fused_rnn: the ",
              cuda::recurrent_name(plan.recurrent), " step loop takes gx in ", state_type, " and weight_hh in ",
              weight_type, ", got ", gx.scalar_type(), " and ", w_hh.scalar_type());
  loop(s, reverse, gx, w_hh, b_hn, w_hr, variants, y, h, c, saved, plan.persistent);
}

// Layer norm's statistics span a row's units, which the CUDA kernels split over blocks: not built yet.
void refuse_layer_norm(const LayerShape& s) {
  TORCH_CHECK_NOT_IMPLEMENTED(!s.layer_norm, "fused_rnn: layer norm runs on the CPU only so far (its CUDA kernels ",
                              "are not built yet); run a layer_norm=True layer on the CPU");
}

void refuse_complex(const Tensor& x) {
  TORCH_CHECK(!x.is_complex(), "fused_rnn: complex inputs are not supported on CUDA (the CUDA kernels handle ",
              "float32, float64 and, computed in float32, float16/bfloat16); run complex layers on the CPU");
}



}  // namespace

namespace cuda {

const char* recurrent_name(Recurrent r) {
  switch (r) {
    case Recurrent::kFloat: return "float32 (CUDA cores)";
    case Recurrent::kDouble: return "float64 (CUDA cores)";
    case Recurrent::kHalf: return "float16 (tensor cores)";
    case Recurrent::kBFloat16: return "bfloat16 (tensor cores)";
    case Recurrent::kTf32: return "TF32 (tensor cores)";
  }
  return "?";
}

std::vector<std::pair<std::string, std::string>> CudaPlan::describe(bool backward) const {
  std::vector<std::pair<std::string, std::string>> out = {
      {"cuBLAS operands", products == at::kDouble     ? "float64"
                          : products == at::kHalf     ? "float16"
                          : products == at::kBFloat16 ? "bfloat16"
                                                      : "float32"},
      {backward ? "dG·W_hh" : "h·W_hhᵀ", recurrent_name(recurrent)},
      {"launches", persistent ? "one per sequence (persistent)" : "per step"}};
  if (backward) out.emplace_back("step", fused_backward ? "fused (one launch)" : "cell kernel, then cuBLAS");
  return out;
}

CudaPlan plan_cuda(bool backward, const LayerShape& s, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    "fused_rnn: the CUDA loops do not take dtype ", dtype);
  CudaPlan plan;
  // The products' operands: the compute type, except for half types on the tensor cores (compute
  // capability 8.0 and up), which multiply the half type itself (cuBLAS for x·W_ihᵀ and the
  // backward's products, h_{t-1}·W_hhᵀ on the tensor cores) and accumulate in float32. Below 8.0
  // the half types run in float32 throughout, as on the CPU.
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  plan.products = !half ? dtype : tensor_cores_take_half_types(device) ? dtype : at::kFloat;
  if (backward) {  // on the CUDA cores, in the compute type
    plan.recurrent = dtype == at::kDouble ? Recurrent::kDouble : Recurrent::kFloat;
    plan.fused_backward = override_value(Override::kCudaUnfusedBackward) == 0;
    plan.persistent = plan.fused_backward && persistent_backward_chosen(plan.recurrent, s);
  } else {
    plan.recurrent = plan.products == at::kHalf       ? Recurrent::kHalf
                     : plan.products == at::kBFloat16 ? Recurrent::kBFloat16
                     : dtype == at::kDouble           ? Recurrent::kDouble
                     : tf32_as_cudnn_would(device)    ? Recurrent::kTf32
                                                      : Recurrent::kFloat;
    plan.persistent = persistent_forward_chosen(plan.recurrent, s);
  }
  return plan;
}

}  // namespace cuda

namespace {

LayerOutputs layer_forward(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, bool reverse, const Tensor& h0,
                           const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
                           const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                           bool need_saved, const optional<Tensor>& w_peephole, double zoneout,
                           const optional<Tensor>& zoneout_masks, const optional<Tensor>& recurrent_masks,
                           const optional<Tensor>& layer_norm) {
  const VariantArgs variants{w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm};
  // Checked in the caller's dtypes, so that a mismatch is reported as such.
  const LayerShape s = describe_layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, variants);
  refuse_complex(x);
  refuse_layer_norm(s);
  const c10::DeviceGuard guard(x.device());
  const cuda::CudaPlan plan = cuda::plan_cuda(false, s, x.scalar_type(), x.device());
  ForwardOperands op = forward_operands(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, variants, plan.products);
  const auto opts = op.h.options();
  Tensor y = at::empty({s.N, s.P}, opts);
  Tensor saved = need_saved ? at::empty({s.N, s.saved_cols()}, opts) : Tensor();
  forward_loop(plan, s, reverse, input_projection(op.x, op.w_ih, op.bias), op.w_hh, op.b_hn, op.w_hr, op.variants,
               y, op.h, op.c, saved);
  return forward_outputs(s, x.scalar_type(), y, op, saved);
}

// The backward step loop the plan names (half types reach it as float32).
void backward_loop(const cuda::CudaPlan& plan, const LayerShape& s, bool reverse, const Tensor& w_hh_conj,
                   const Tensor& w_hr_conj, const Variants& variants, const Tensor& outputs, const Tensor& h0,
                   const Tensor& c0, const Tensor& saved,
                   const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh, Tensor& dh_total) {
  const bool float64 = plan.recurrent == cuda::Recurrent::kDouble;
  TORCH_CHECK(saved.scalar_type() == (float64 ? at::kDouble : at::kFloat), "fused_rnn: the ",
              cuda::recurrent_name(plan.recurrent), " backward loop does not take dtype ", saved.scalar_type());
  const auto loop = float64 ? &backward_loop_cuda_double : &backward_loop_cuda_float;
  loop(s, reverse, w_hh_conj, w_hr_conj, variants, outputs, h0, c0, saved, dy, dh, dc, dgx, dgh, dh_total,
       plan.fused_backward, plan.persistent);
}

LayerGradients layer_backward(int64_t cell, const Tensor& x, at::IntArrayRef batch_sizes, bool reverse,
                              const Tensor& h0, const optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
                              const optional<Tensor>& w_hr, bool has_bias, const Tensor& y, const Tensor& saved,
                              const optional<Tensor>& dy, const optional<Tensor>& dh_n,
                              const optional<Tensor>& dc_n, bool need_input_grad, const optional<Tensor>& w_peephole,
                              double zoneout, const optional<Tensor>& zoneout_masks,
                              const optional<Tensor>& recurrent_masks, const optional<Tensor>& layer_norm) {
  const VariantArgs variants{w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm};
  const LayerShape s =
      describe_layer_backward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, y, saved, dy, dh_n, dc_n, variants);
  refuse_complex(x);
  refuse_layer_norm(s);
  const c10::DeviceGuard guard(x.device());
  const cuda::CudaPlan plan = cuda::plan_cuda(true, s, x.scalar_type(), x.device());
  BackwardOperands op = backward_operands(s, x, h0, c0, w_ih, w_hh, w_hr, variants, y, saved, dy, dh_n, dc_n);
  const auto opts = op.x.options();
  const int64_t GH = s.gates * s.H;
  Tensor dh_total = s.proj ? at::empty({s.N, s.P}, opts) : Tensor();
  // The loop writes the gate gradients: dgx [N, G*H], and for GRU dgh (the recurrent side, whose
  // n gate differs by r), else the same tensor. It takes the weights' conjugates, which for the
  // real types here are the weights.
  Tensor dgx = at::empty({s.N, GH}, opts);
  Tensor dgh = s.cell == CellKind::GRU ? at::empty({s.N, GH}, opts) : dgx;
  backward_loop(plan, s, reverse, op.w_hh, op.w_hr, op.variants, op.outputs, op.h0, op.c0, op.saved, op.dy, op.dh,
                op.dc, dgx, dgh, dh_total);

  // The once-per-sequence products and sums; plain reductions, so results are reproducible.
  const Tensor h_prev = previous_outputs(s, reverse, op.product_outputs, op.product_h0);  // as the products took them
  Tensor dx, dw_ih, dw_hh;
  const at::ScalarType product_type = plan.products;
  if (product_type == op.x.scalar_type()) {
    if (need_input_grad) dx = at::mm(dgx, op.w_ih);
    dw_ih = at::mm(dgx.t(), op.x);
    dw_hh = at::mm(dgh.t(), h_prev);
  } else {
    // Half types, as the forward's products: half operands, float32 accumulation; the results come
    // out rounded to the half type, which they are returned in anyway. The gate gradients lose
    // their float32 precision here only.
    const auto operand = [&](const Tensor& t) { return t.to(product_type); };
    const Tensor dgx_op = operand(dgx), dgh_op = s.cell == CellKind::GRU ? operand(dgh) : dgx_op;
    if (need_input_grad) dx = at::mm(dgx_op, operand(op.w_ih));
    dw_ih = at::mm(dgx_op.t(), operand(op.x));
    dw_hh = at::mm(dgh_op.t(), operand(h_prev));
  }
  Tensor db_ih, db_hh;
  if (has_bias) {
    db_ih = dgx.sum(0);
    // Both biases add to the same pre-activations, except GRU's b_hn (scaled by r): same gradient.
    db_hh = s.cell == CellKind::GRU ? dgh.sum(0) : db_ih.clone();
  }
  Tensor dw_hr;
  if (s.proj) dw_hr = at::mm(dh_total.t(), op.saved.narrow(1, s.proj_input_col(), s.H));
  // The peepholes' gradient from the gate gradients: p_i and p_f saw c_{t-1}, p_o the cell's own c_t
  // (under zoneout ĉ_t, in its own slot; c_{t-1} is then the mixed state) (cells.h).
  Tensor dw_peephole;
  if (s.peephole) {
    const int64_t H = s.H;
    const Tensor c_t = op.saved.narrow(1, s.cell_state_col(), H);
    const Tensor c_own = s.zoneout > 0 ? op.saved.narrow(1, LSTMCell<float>::kOwnStateSlot * H, H) : c_t;
    const Tensor c_prev = previous_outputs(s, reverse, c_t, op.c0);
    dw_peephole = at::cat({(dgx.narrow(1, 0, H) * c_prev).sum(0), (dgx.narrow(1, H, H) * c_prev).sum(0),
                           (dgx.narrow(1, 3 * H, H) * c_own).sum(0)});
  }
  return gradients_as({dx, op.dh, op.dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dw_peephole, Tensor()},
                      x.scalar_type());
}

}  // namespace

void implement_cuda_ops(torch::Library& m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
}

}  // namespace fused_rnn
