// The user's overrides of the kernel plans (csrc/cpu/kernel_plan.h, csrc/cuda/cuda_plan.h) and of
// the CPU block cache. Each starts from its FUSED_RNN_* environment variable, read once when the
// extension loads (overrides.cpp, the one place in csrc that reads the environment), and can be
// changed at run time (fused_rnn.set_overrides, fused_rnn.overrides_set): the plans read them per
// call. A value that is not valid is an error naming the valid ones, from either source.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fused_rnn {

enum class Override : int {
  kFloatKernel,          // float_kernel: auto | amx | avx512 | avx2 (the float32 products on the CPU)
  kChunkGemm,            // chunk_gemm: auto | tiles | blas (float32 dW, and x·W_ihᵀ at a batch of one)
  kInt8Kernel,           // int8_kernel: auto | vnni | avx2 | scalar (the int8 products)
  kAmxStepRows,          // amx_step_rows: from how many rows a step's product takes AMX (16)
  kCpuCacheMb,           // cpu_cache_mb: the CPU block cache's limit in MB (1024; 0 turns it off)
  kCudaPersistent,       // cuda_persistent: auto | 1 (wherever it can run) | 0 (never)
  kCudaUnfusedBackward,  // cuda_unfused_backward: 0 | 1 (two launches per backward step)
  kCudaRowsPerBlock,     // cuda_rows_per_block: 0 (the cost model's pick) or a variant's rows
  kCount
};

// The words of the word-valued overrides, in the order of their values.
enum FloatKernelChoice : int64_t { kFloatAuto, kFloatAmx, kFloatAvx512, kFloatAvx2 };
enum ChunkGemmChoice : int64_t { kChunkGemmAuto, kChunkGemmTiles, kChunkGemmBlas };
enum Int8KernelChoice : int64_t { kInt8Auto, kInt8Vnni, kInt8Avx2, kInt8Scalar };
enum CudaPersistentChoice : int64_t { kPersistentAuto, kPersistentAlways, kPersistentNever };

// The values, one atomic each: a call reads them while another thread may set them.
using OverrideValues = std::atomic<int64_t>[static_cast<int>(Override::kCount)];

// The store this library reads: the extension's own, or in the emulated CUDA build (which is a
// second module) the extension's, attached when the emulation loads (attach_overrides).
OverrideValues& override_values();
inline int64_t override_value(Override which) { return override_values()[static_cast<int>(which)].load(); }

#ifndef FUSED_RNN_EMULATED_CUDA
// By name (the variable's name without FUSED_RNN_, lower case): the current value as written,
// and setting one from its text (std::invalid_argument, Python's ValueError, when not valid).
std::vector<std::pair<std::string, std::string>> overrides_by_name();
void set_override(const std::string& name, const std::string& value);
// For each word-valued override, the words this CPU can run (float_kernel without amx where the
// CPU has no AMX, ...): what tests iterate over.
std::vector<std::pair<std::string, std::vector<std::string>>> override_choices();
#else
void attach_overrides(OverrideValues* values);
#endif

}  // namespace fused_rnn
