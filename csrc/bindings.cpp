// The Python module fused_rnn._C. The ops themselves are registered with the dispatcher in
// layer.cpp (torch.ops.fused_rnn.*), which routes them to the CPU or CUDA loop; importing this
// module loads them. What it adds is the build's own description.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn compiled ops (registered as torch.ops.fused_rnn)";
#ifdef FUSED_RNN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
