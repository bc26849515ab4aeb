// The device interface (csrc/cuda/device.h) under the emulation, the host's side, and the Python
// module that fused_rnn.testing builds on first use. While it is started, fused_rnn's ops on CPU
// tensors run the CUDA half (csrc/cuda/ops_cuda.cpp, compiled into this module with the contract,
// csrc/layer.cpp, and the loops, forward_emulated.cpp and backward_emulated.cpp): its kernels on
// fibers, its matrix products and copies by ATen on the CPU, on the numbers of an emulated GPU.
#include <torch/extension.h>

#include <memory>

#include "../overrides.h"
#include "device_emulated.h"

namespace fused_rnn {
namespace device {

int multiprocessor_count() { return emulated_cuda::gpu.multiprocessors; }

int compute_capability(const at::Device&) { return emulated_cuda::gpu.compute_capability; }

bool capturing_a_graph() { return false; }

at::Tensor upload(const std::vector<int64_t>& values, const at::Device& device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(device);
}

// A product of two float16 or bfloat16 numbers is exact in float32 (11 + 11 significant bits
// fit in 24), so float32 operands summed in float32 give cuBLAS's mixed-precision numbers, but
// for the order of the sums.
at::Tensor product_in_float(const at::Tensor& a, const at::Tensor& b) {
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

}  // namespace device

// The overrides this module's CUDA half reads are the extension's (csrc/overrides.h): one store,
// attached by fused_rnn.testing when it loads this module.
namespace {
OverrideValues* attached_overrides = nullptr;
}  // namespace

void attach_overrides(OverrideValues* values) { attached_overrides = values; }

OverrideValues& override_values() {
  TORCH_CHECK(attached_overrides, "fused_rnn: the CUDA emulation was loaded without fused_rnn._C's overrides");
  return *attached_overrides;
}

namespace {

// The CUDA half's registration under the CPU key while the emulation is started: destroying it
// gives the CPU half its ops back.
std::unique_ptr<torch::Library> cuda_half_on_cpu;

void start() {
  TORCH_CHECK(!cuda_half_on_cpu, "fused_rnn: the CUDA emulation is already started");
  cuda_half_on_cpu =
      std::make_unique<torch::Library>(torch::Library::IMPL, "fused_rnn", c10::DispatchKey::CPU, __FILE__, __LINE__);
  implement_cuda_ops(*cuda_half_on_cpu);
}

void stop() { cuda_half_on_cpu.reset(); }

void configure(int multiprocessors, int compute_capability, bool blocks_descending) {
  TORCH_CHECK(multiprocessors > 0, "fused_rnn: the emulated GPU needs at least one multiprocessor");
  emulated_cuda::gpu.multiprocessors = multiprocessors;
  emulated_cuda::gpu.compute_capability = compute_capability;
  emulated_cuda::blocks_descending = blocks_descending;
}

}  // namespace
}  // namespace fused_rnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fused_rnn;
  m.doc() = "fused_rnn's CUDA half compiled for the CPU over an emulation of CUDA (fused_rnn.testing)";
  m.def(
      "attach_overrides",
      [](uintptr_t address, int64_t count) {
        TORCH_CHECK(count == static_cast<int64_t>(fused_rnn::Override::kCount), "fused_rnn: fused_rnn._C has ", count,
                    " overrides and this emulation ", static_cast<int>(fused_rnn::Override::kCount),
                    ": they were built from different sources; rebuild both");
        fused_rnn::attach_overrides(reinterpret_cast<fused_rnn::OverrideValues*>(address));
      },
      "read the overrides of fused_rnn._C (count of them), at this address (fused_rnn._C._overrides_address())");
  m.def("start", &start, "route fused_rnn's ops on CPU tensors to the CUDA half");
  m.def("stop", &stop, "give the CPU half its ops back");
  m.def("configure", &configure, "the emulated GPU: multiprocessors, compute capability (major * 10 + minor), "
        "and whether a grid's blocks run in descending order");
  m.def("launches", [] { return emulated_cuda::launches.load(); }, "kernel launches emulated so far");
  m.def(
      "chosen_rows_per_block",
      [](const std::string& kernel, int64_t cell, int64_t n, int64_t H, int64_t P, bool float64) {
        LayerShape s;
        describe_cell(s, cell);
        return chosen_rows_per_block(kernel, s.cell, n, H, P, float64);
      },
      "rows per block of the variant that a step of n rows takes");
  m.def(
      "persistent_chosen",
      [](const std::string& kernel, int64_t cell, int64_t B, int64_t H, int64_t proj, bool float64) {
        const LayerShape s = padded_layer(cell, 1, B, 0, H, proj);
        using cuda::Recurrent;
        const bool cuda_cores = kernel == "forward" || kernel == "backward";
        TORCH_CHECK(cuda_cores || kernel == "float16" || kernel == "bfloat16" || kernel == "tf32", "unknown kernel ",
                    kernel);
        TORCH_CHECK(cuda_cores || !float64, "fused_rnn: the tensor cores' cells run in float32");
        const Recurrent recurrent = kernel == "float16"    ? Recurrent::kHalf
                                    : kernel == "bfloat16" ? Recurrent::kBFloat16
                                    : kernel == "tf32"     ? Recurrent::kTf32
                                    : float64              ? Recurrent::kDouble
                                                           : Recurrent::kFloat;
        return kernel == "backward" ? persistent_backward_chosen(recurrent, s) : persistent_forward_chosen(recurrent, s);
      },
      "whether a padded layer takes a persistent kernel");
  m.def(
      "cuda_plan",
      [](bool backward, int64_t cell, at::ScalarType dtype, int64_t T, int64_t B, int64_t I, int64_t H,
         int64_t proj) {
        return cuda::plan_cuda(backward, padded_layer(cell, T, B, I, H, proj), dtype, at::Device(at::kCPU))
            .describe(backward);
      },
      "the CUDA plan of a padded call on the emulated GPU: (decision, choice) pairs");
}
