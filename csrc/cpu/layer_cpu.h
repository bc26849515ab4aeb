// The CPU half's loops and helpers, shared by the files of csrc/cpu/: ops_cpu.cpp (the ops on the
// CPU) asks kernel_plan.h for a plan and runs the step loops of forward_loop.cpp and
// backward_loop.cpp with it; quantized_cpu.cpp holds the int8 path.
#pragma once

#include <ATen/ATen.h>

#include "../layer.h"
#include "kernel_plan.h"

namespace fused_rnn {

// at::empty, for the large per-call tensors (outputs, saved values, chunk buffers, input
// gradients). On the CPU their memory comes from a cache of freed blocks, which spares each call
// the page faults of fresh memory (csrc/cpu/block_cache.cpp).
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);
// The bytes of free blocks the cache holds, and giving them all back (fused_rnn.empty_cache()).
size_t cpu_cache_bytes();
void empty_cpu_cache();
// The step loops. All tensors are contiguous except the documented views.
//   x, w_ih, bias  [N, I], [G*H, I], the folded bias [G*H] (or undefined): the loop computes
//                    x·W_ihᵀ + bias a chunk of steps at a time
//   b_hn   [H]       GRU's n-gate hidden bias, or undefined
//   y      [N, P]    output, written
//   variants         the operands of the options torch.nn lacks (layer.h), each undefined when off
//   h, c   [B, P], [B, H]  state: initial in, final out (c undefined unless LSTM)
//   saved  [N, saved_cols] written when defined (a gradient is wanted)
void forward_loop_cpu(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const at::Tensor& x, const at::Tensor& w_ih,
                      const at::Tensor& bias, const at::Tensor& w_hh, const at::Tensor& b_hn,
                      const at::Tensor& w_hr, const Variants& variants, at::Tensor& y, at::Tensor& h, at::Tensor& c,
                      at::Tensor& saved);

// One int8 weight matrix of the quantized inference path, w [G*H, K] with a scale per row
// (w ≈ scale[r] · q[r, k]): q laid out in panels by pack_int8_panels, the scales, and the row
// sums of q (int32), which take the activations' zero point back out of the integer products.
struct QuantizedMatrix {
  at::Tensor panels, scale, row_sum;
};

// q [G*H, K] int8 -> panels [G·⌈H/16⌉, ⌈K/4⌉, 64] int8: each gate's rows in groups of 16 and k in
// quads, panels[i][j][4r + t] = q[g·H + 16m + r][4j + t] for group i = g·⌈H/16⌉ + m, zero past H
// or K (quantized_cpu.cpp says why).
at::Tensor pack_int8_panels(const at::Tensor& q, int64_t gates);
constexpr int64_t kInt8GroupRows = 16, kInt8Quad = 4, kInt8PanelBytes = kInt8GroupRows * kInt8Quad;
inline int64_t int8_groups_per_gate(int64_t H) { return (H + kInt8GroupRows - 1) / kInt8GroupRows; }
inline int64_t int8_quads(int64_t K) { return (K + kInt8Quad - 1) / kInt8Quad; }

// The forward of the int8 inference path (csrc/cpu/quantized_cpu.cpp): x [N, I] and every
// activation quantized row by row to 8 bits, int32 sums, the gate math in float32. bias is the
// folded bias [G*H] (or undefined), b_hn GRU's n-gate hidden bias; y, h, c as forward_loop_cpu's.
void quantized_forward_loop_cpu(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const at::Tensor& x, const QuantizedMatrix& w_ih,
                                const QuantizedMatrix& w_hh, const at::Tensor& bias, const at::Tensor& b_hn,
                                at::Tensor& y, at::Tensor& h, at::Tensor& c);

// The gradients of a layer's input and weights, allocated by the caller: dx empty (undefined when
// not wanted), the rest zero, so that a loop may add to them.
struct LayerGrads {
  at::Tensor dx;            // [N, I]
  at::Tensor dw_ih, dw_hh;  // [G*H, I], [G*H, P]
  at::Tensor db_ih, db_hh;  // [G*H]; undefined without biases; db_hh written by the loops for GRU only
  at::Tensor d_peephole;    // [3*H] for an LSTM with peephole weights, else undefined
  at::Tensor d_layer_norm;  // as the layer norm's weights (Variants::layer_norm), else undefined
};

// op: the backward's operands (layer.h's BackwardOperands; the loop turns op.dh and op.dc, the
// gradients at h_n and c_n, into those at h_0 and c_0), and
//   w_hh_conj, w_hr_conj  conj of the weights (the same tensors for real types)
//   dh_total [N, P] written with the full gradient at each h_t when the LSTM has a projection
// The CPU loop also delivers `grads`: it multiplies the gate gradients out a chunk of steps at a
// time, while they are in cache.
void backward_loop_cpu(const cpu::CpuPlan& plan, const LayerShape& s, bool reverse, const BackwardOperands& op,
                       const at::Tensor& w_hh_conj, const at::Tensor& w_hr_conj, at::Tensor& dh_total,
                       LayerGrads& grads);

}  // namespace fused_rnn
