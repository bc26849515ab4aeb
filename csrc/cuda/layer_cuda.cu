// The GPU side of csrc/cuda/step_loops.cuh (the step loops and their CUDA-core kernels, described
// there): kernel launches on the current stream, the half types' forward step on the tensor cores,
// and the entry points that layer.cpp calls.
//
// Tensor cores: float16/bfloat16 W_hh (nvcuda::wmma 16x16x16, float32 accumulators), compute
// capability 8.0 and up: 16 units per block, one warp per gate, 16 or 64 batch rows per block.
// h_{t-1} is kept in float32 and rounded to the half type as it is staged for the product.
// Everything else is float32: gx (cuBLAS, half inputs, float32 accumulation and output: layer.cpp),
// c, the gate math (Cell<float>), y, h and `saved`; layer.cpp casts y, h_n and c_n back to the half
// type. Backward: half types reach it as float32 (layer.cpp upcasts).
//
// Dtypes: float, double, and (forward) Half/BFloat16 weights with float32 everything else; complex
// is rejected in layer.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "step_loops.cuh"

namespace fused_rnn {
namespace {

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// --- float16/bfloat16 on the tensor cores --------------------------------------------------------
//
// Block: G warps; warp g computes gate g of the block's kMmaUnits units for kRowTiles * 16 batch
// rows, as kRowTiles 16x16 float32 accumulator fragments. Per k chunk the block stages, in shared
// memory, the W_hh slab [kMmaK][G*kMmaUnits] (the wmma B operand, row-major: element (k, column)) and
// h_{t-1} [rows][kMmaK] (the A operand, row-major, rounded to the half type), zero-padded past n, P
// and H, so any n, H and P work. Then the accumulators go to shared memory and each thread runs the
// float32 epilogue on (row, unit) pairs.
// Shared rows carry kMmaPad extra elements (16 bytes), which keeps them 16-byte aligned, wmma's ldm a
// multiple of 8 (16-bit) or 4 (float), every fragment pointer 32-byte aligned (row offsets of 16 rows
// and column offsets of 16 elements), and moves successive rows to other banks.
// Shared memory, LSTM, kRowTiles=4: 9 KB (W) + 9 KB (h) + 17 KB (sums), under the 48 KB static limit.
namespace wmma = nvcuda::wmma;

constexpr int kMmaK = 64;      // reduction chunk staged per iteration: 4 fragment steps
constexpr int kMmaPad = 8;     // elements of padding per shared row of 16-bit values (16 bytes)
constexpr int kSumPad = 4;     // and of float sums (16 bytes)

template <typename W>
__device__ __forceinline__ W round_to(float v);
template <>
__device__ __forceinline__ __half round_to<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 round_to<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename Cell, typename W, int kRowTiles>
__global__ void __launch_bounds__(32 * Cell::kGates)
    forward_step_tensor_core_kernel(const ForwardArgs<float, W> a) {
  static_assert(std::is_same_v<typename Cell::scalar_t, float>, "half types run the gate math in float32");
// bfloat16 fragments need compute capability 8.0; the host launches this only there
// (cuda_tensor_cores_take_half_types), so older targets compile an empty body.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int G = Cell::kGates;
  constexpr int kBlockThreads = 32 * G;
  constexpr int kRows = 16 * kRowTiles;
  constexpr int kCols = G * kMmaUnits;  // column g * kMmaUnits + unit
  constexpr int kWPitch = kCols + kMmaPad, kHPitch = kMmaK + kMmaPad, kSumPitch = kCols + kSumPad;

  __shared__ __align__(32) W w_s[kMmaK * kWPitch];
  __shared__ __align__(32) W h_s[kRows * kHPitch];
  __shared__ __align__(32) float sum_s[kRows * kSumPitch];

  const int tid = threadIdx.x, gate = tid / 32;
  const int64_t P = a.P, n = a.n;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t unit0 = static_cast<int64_t>(blockIdx.y) * kMmaUnits;
  const W* slab = a.w_tiles + static_cast<int64_t>(blockIdx.y) * P * kCols;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRowTiles];
#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) wmma::fill_fragment(acc[m], 0.0f);

  for (int64_t k0 = 0; k0 < P; k0 += kMmaK) {
    stage_weight_rows<kMmaK, kCols, kWPitch, kBlockThreads>(w_s, slab, k0, P, tid);
    for (int e = tid; e < kRows * kMmaK; e += kBlockThreads) {
      const int r = e / kMmaK, kk = e % kMmaK;
      const int64_t b = row0 + r, k = k0 + kk;
      h_s[r * kHPitch + kk] = round_to<W>((b < n && k < P) ? a.h[b * P + k] : 0.0f);
    }
    __syncthreads();
    // Zero padding past P in both operands adds exact zeros; the k order is fixed.
#pragma unroll
    for (int kk = 0; kk < kMmaK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> w_frag;
      wmma::load_matrix_sync(w_frag, w_s + kk * kWPitch + gate * kMmaUnits, kWPitch);
#pragma unroll
      for (int m = 0; m < kRowTiles; ++m) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> h_frag;
        wmma::load_matrix_sync(h_frag, h_s + m * 16 * kHPitch + kk, kHPitch);
        wmma::mma_sync(acc[m], h_frag, w_frag, acc[m]);
      }
    }
    __syncthreads();  // before the next chunk overwrites the tiles
  }

#pragma unroll
  for (int m = 0; m < kRowTiles; ++m) {
    wmma::store_matrix_sync(sum_s + m * 16 * kSumPitch + gate * kMmaUnits, acc[m], kSumPitch, wmma::mem_row_major);
  }
  __syncthreads();

  for (int e = tid; e < kRows * kMmaUnits; e += kBlockThreads) {
    const int r = e / kMmaUnits, u = e % kMmaUnits;
    const int64_t b = row0 + r, j = unit0 + u;
    if (b >= n || j >= a.H) continue;
    float sum[G];
#pragma unroll
    for (int g = 0; g < G; ++g) sum[g] = sum_s[r * kSumPitch + g * kMmaUnits + u];
    finish_unit<Cell>(a, b, j, sum);
  }
#endif
}

// Declared in step_loops.cuh, for ForwardLoop.
template <typename Cell, typename W>
void launch_tensor_core_step(const ForwardArgs<float, W>& a, int sms) {
  const dim3 block(32 * Cell::kGates);
  if (fills_the_gpu(a.n, a.H, 16 * 4, kMmaUnits, sms)) {
    launch(&forward_step_tensor_core_kernel<Cell, W, 4>, step_grid(a.n, a.H, 16 * 4, kMmaUnits), block, a);
  } else {
    launch(&forward_step_tensor_core_kernel<Cell, W, 1>, step_grid(a.n, a.H, 16, kMmaUnits), block, a);
  }
}

template <typename Cell>
using HalfTensorCoreForwardLoop = ForwardLoop<Cell, __half>;
template <typename Cell>
using BFloat16TensorCoreForwardLoop = ForwardLoop<Cell, __nv_bfloat16>;

}  // namespace

void forward_loop_cuda(const LayerShape& s, bool reverse, const Tensor& gx, const Tensor& w_hh, const Tensor& b_hn,
                       const Tensor& w_hr, Tensor& y, Tensor& h, Tensor& c, Tensor& saved) {
  TORCH_CHECK(gx.is_cuda(), "fused_rnn: forward_loop_cuda needs CUDA tensors");
  TORCH_CHECK(!gx.is_complex(), "fused_rnn: complex inputs are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(gx.device());
  const auto w_type = w_hh.scalar_type();
  if (w_type == at::kHalf || w_type == at::kBFloat16) {
    TORCH_CHECK(gx.scalar_type() == at::kFloat, "fused_rnn: half-type weights need a float32 gx, got ",
                gx.scalar_type());
    if (w_type == at::kHalf) {
      dispatch_cell<HalfTensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
    } else {
      dispatch_cell<BFloat16TensorCoreForwardLoop, float>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c,
                                                          saved);
    }
    return;
  }
  TORCH_CHECK(w_type == gx.scalar_type(), "fused_rnn: weight_hh has dtype ", w_type, " but gx ", gx.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "fused_rnn_forward_cuda", [&] {
    dispatch_cell<CudaCoreForwardLoop, scalar_t>(s.cell, s, reverse, gx, w_hh, b_hn, w_hr, y, h, c, saved);
  });
}

bool cuda_tensor_cores_take_half_types(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->major >= 8;  // see forward_step_tensor_core_kernel
}

void backward_loop_cuda(const LayerShape& s, bool reverse, const Tensor& w_hh_conj, const Tensor& w_hr_conj,
                        const Tensor& outputs, const Tensor& h0, const Tensor& c0, const Tensor& saved,
                        const Tensor& dy, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh, Tensor& dh_total) {
  TORCH_CHECK(saved.is_cuda(), "fused_rnn: backward_loop_cuda needs CUDA tensors");
  TORCH_CHECK(!saved.is_complex(), "fused_rnn: complex inputs are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(saved.device());
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "fused_rnn_backward_cuda", [&] {
    dispatch_cell<BackwardLoop, scalar_t>(s.cell, s, reverse, w_hh_conj, w_hr_conj, outputs, h0, c0, saved, dy, dh,
                                          dc, dgx, dgh, dh_total);
  });
}

}  // namespace fused_rnn
