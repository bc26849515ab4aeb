// The tensor-core instructions that the step kernels take from PTX, for the GPU: ldmatrix (shared
// memory to fragments, one instruction for four 8x8 tiles of 16-bit values) and mma.sync (a warp's
// 16x8 tile of float32 sums). csrc/cuda_emulation/emulated_cuda.h defines the same names over
// its fibers, from the fragment layouts of the PTX ISA, which are spelled out here once.
//
// g = lane / 4, t = lane % 4. Registers hold two 16-bit values, the lower column in the low half.
//  - mma m16n8k16 (float16, bfloat16): A (16x16, row-major) a[0] = A[g][2t, 2t+1],
//    a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]; B (16x8, k by n)
//    b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]; C and D (16x8 float) d[0], d[1] = C[g][2t, 2t+1],
//    d[2], d[3] = C[g+8][2t, 2t+1].
//  - mma m16n8k8 (TF32, one value per register): a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4],
//    a[3] = A[g+8][t+4]; b[0] = B[t][g], b[1] = B[t+4][g]; C and D as above.
//  - ldmatrix x4: lanes 8i .. 8i+7 give the addresses of rows 0..7 of tile i (16 bytes each,
//    16-byte aligned, in shared memory); lane l receives r[i] = tile i's row l/4, columns 2(l%4) and
//    2(l%4)+1, or with .trans its column l/4, rows 2(l%4) and 2(l%4)+1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace ptx {

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d += a·b on a 16x8x16 tile; W is __half or __nv_bfloat16.
template <typename W>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<W, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<W, __nv_bfloat16>, "mma m16n8k16 takes float16 or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// d += a·b on a 16x8x8 tile of TF32 values (float32 bits, rounded by to_tf32).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// float32 to TF32, to nearest with ties away from zero; the result is float32 bits.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(v));
  return bits;
}

}  // namespace ptx
