// The Python module fused_rnn._C. The ops themselves (torch.ops.fused_rnn.*) are registered with the
// dispatcher: their schemas in csrc/ops.cpp, their implementations by each device's half; importing
// this module loads them. What it adds is the build's own description and the CPU block cache's
// controls.
#include <torch/extension.h>

#include "cpu/layer_cpu.h"

#ifndef FUSED_RNN_CUDA_ARCHS  // set by setup.py for a CUDA build: TORCH_CUDA_ARCH_LIST as built
#define FUSED_RNN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn compiled ops (registered as torch.ops.fused_rnn)";
#ifdef FUSED_RNN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("cuda_archs") = FUSED_RNN_CUDA_ARCHS;
#ifdef CPU_CAPABILITY_AVX2
  m.attr("cpu_vector_math") = "AVX2+FMA";
#else
  m.attr("cpu_vector_math") = "scalar (portable build)";
#endif
#ifdef _OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif
  m.def("cpu_float_kernel", &fused_rnn::cpu_float_kernel, "the CPU's float32 product kernel: AVX-512 or AVX2");
  m.def("cpu_input_projection", &fused_rnn::cpu_input_projection,
        "what the float32 forward's x·W_ih^T takes on the CPU: AMX, tiles or BLAS");
  m.def("cpu_gradient_gemm", &fused_rnn::cpu_gradient_gemm,
        "what the float32 gradient products take: the AVX-512 tiles or BLAS");
  m.def("cpu_cache_bytes", &fused_rnn::cpu_cache_bytes, "bytes of freed CPU blocks kept for reuse");
  m.def("empty_cpu_cache", &fused_rnn::empty_cpu_cache, "gives the kept CPU blocks back to the system");
}
