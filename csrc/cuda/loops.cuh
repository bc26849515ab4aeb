// The step loops and their kernels (step_loops.cuh, persistent_loops.cuh) over this build's device:
// CUDA itself (device_gpu.cuh, compiled by nvcc), or, compiled for the CPU with
// FUSED_RNN_EMULATED_CUDA (fused_rnn.testing.emulate_cuda()), the emulation of it
// (csrc/cuda_emulation/device_emulated.h). Included by the loops' translation units, forward.cu and
// backward.cu, which both builds compile.
#pragma once

#ifdef FUSED_RNN_EMULATED_CUDA
#include "../cuda_emulation/device_emulated.h"
#else
#include "device_gpu.cuh"
#endif

#include "persistent_loops.cuh"  // and step_loops.cuh
