// The Python module fused_rnn._C. The ops themselves (torch.ops.fused_rnn.*) are registered with the
// dispatcher: their schemas in csrc/ops.cpp, their implementations by each device's half; importing
// this module loads them. What it adds: the build's description, the constants the Python side
// shares with the C++ (cells, saved columns, the int8 panels), the overrides (csrc/overrides.h),
// the CPU kernel plan (csrc/cpu/kernel_plan.h), the CPU block cache's controls, and the two ops
// called below autograd for fused_rnn/functional.py's plain eager calls.
#include <torch/extension.h>

#include <stdexcept>

#include "cpu/layer_cpu.h"
#include "overrides.h"
#ifdef FUSED_RNN_WITH_CUDA
#include <c10/core/DeviceGuard.h>

#include "cuda/cuda_plan.h"
#endif

#ifndef FUSED_RNN_CUDA_ARCHS  // set by setup.py for a CUDA build: TORCH_CUDA_ARCH_LIST as built
#define FUSED_RNN_CUDA_ARCHS ""
#endif

namespace {

using namespace pybind11::literals;
using fused_rnn::CellKind;

// The plan of a padded call of T steps with these sizes (kernel_plan.h's plan_cpu).
// Half types compute in float32 on the CPU, as torch.nn does: they take float32's plan.
std::vector<std::pair<std::string, std::string>> cpu_plan(const std::string& pass, int64_t cell, at::ScalarType dtype,
                                                          int64_t T, int64_t B, int64_t I, int64_t H,
                                                          int64_t proj_size, bool need_input_grad) {
  using fused_rnn::cpu::Pass;
  const Pass p = pass == "forward" ? Pass::kForward : pass == "backward" ? Pass::kBackward
               : pass == "int8"    ? Pass::kInt8Forward
                                   : throw std::invalid_argument("fused_rnn: pass must be forward, backward or int8, got '" + pass + "'");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16 ||
                        dtype == at::kComplexFloat || dtype == at::kComplexDouble,
                    "fused_rnn: the CPU layers take float32, float64, float16, bfloat16, complex64 and complex128, "
                    "got ", dtype);
  const at::ScalarType compute = dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
  const fused_rnn::LayerShape s = fused_rnn::padded_layer(cell, T, B, I, H, proj_size);
  return fused_rnn::cpu::plan_cpu(p, s, compute, need_input_grad).describe(p);
}

#ifdef FUSED_RNN_WITH_CUDA
// The plan of a padded call on GPU `device` (cuda_plan.h's plan_cuda).
std::vector<std::pair<std::string, std::string>> cuda_plan(bool backward, int64_t cell, at::ScalarType dtype,
                                                           int64_t T, int64_t B, int64_t I, int64_t H,
                                                           int64_t proj_size, int64_t device) {
  const fused_rnn::LayerShape s = fused_rnn::padded_layer(cell, T, B, I, H, proj_size);
  const at::Device gpu(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  const c10::DeviceGuard guard(gpu);
  return fused_rnn::cuda::plan_cuda(backward, s, dtype, gpu).describe(backward);
}
#endif

// torch.ops.fused_rnn.layer_forward below autograd, for fused_rnn/functional.py's plain eager calls:
// the op's autograd kernel is Python (functional.py's register_autograd), and a call through it costs
// about 30 µs when it records a backward and 8 µs when it finds nothing to record, more than a small
// cell's whole step (bench/NOTES.md). The caller records the backward itself where one is wanted
// (functional.py's _EagerLayer). Devices, Python dispatch modes and tensor subclasses with
// __torch_dispatch__ are dispatched as usual.
fused_rnn::LayerOutputs layer_forward_below_autograd(int64_t cell, const at::Tensor& x,
                                                     const std::vector<int64_t>& batch_sizes, bool reverse,
                                                     const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                     const c10::optional<at::Tensor>& b_ih,
                                                     const c10::optional<at::Tensor>& b_hh,
                                                     const c10::optional<at::Tensor>& w_hr, bool need_saved,
                                                     const c10::optional<at::Tensor>& w_peephole, double zoneout,
                                                     const c10::optional<at::Tensor>& zoneout_masks,
                                                     const c10::optional<at::Tensor>& recurrent_masks,
                                                     const c10::optional<at::Tensor>& layer_norm) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_rnn::layer_forward", "")
          .typed<fused_rnn::LayerOutputs(int64_t, const at::Tensor&, at::IntArrayRef, bool, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&, bool,
                                         const c10::optional<at::Tensor>&, double,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&)>();
  // Devices first: a meta tensor among CPU ones would take the op's meta kernel, which checks none.
  for (const c10::optional<at::Tensor>& t : {c10::optional<at::Tensor>(h0), c0, c10::optional<at::Tensor>(w_ih),
                                             c10::optional<at::Tensor>(w_hh), b_ih, b_hh, w_hr, w_peephole,
                                             zoneout_masks, recurrent_masks, layer_norm}) {
    TORCH_CHECK(!t.has_value() || !t->defined() || t->device() == x.device(), "fused_rnn: the operands of ",
                "layer_forward must be on the input's device ", x.device(), ", found one on ", t->device());
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved, w_peephole, zoneout,
                 zoneout_masks, recurrent_masks, layer_norm);
}

// torch.ops.fused_rnn.layer_backward the same way (it has no autograd kernel of its own: the
// dispatcher's fallback, and the boxing of 16 arguments from Python, are what this spares).
fused_rnn::LayerGradients layer_backward_below_autograd(
    int64_t cell, const at::Tensor& x, const std::vector<int64_t>& batch_sizes, bool reverse, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& w_hr, bool has_bias, const at::Tensor& y, const at::Tensor& saved,
    const c10::optional<at::Tensor>& grad_y, const c10::optional<at::Tensor>& grad_h_n,
    const c10::optional<at::Tensor>& grad_c_n, bool need_input_grad, const c10::optional<at::Tensor>& w_peephole,
    double zoneout, const c10::optional<at::Tensor>& zoneout_masks, const c10::optional<at::Tensor>& recurrent_masks,
    const c10::optional<at::Tensor>& layer_norm) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_rnn::layer_backward", "")
          .typed<fused_rnn::LayerGradients(
              int64_t, const at::Tensor&, at::IntArrayRef, bool, const at::Tensor&, const c10::optional<at::Tensor>&,
              const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, bool, const at::Tensor&,
              const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
              const c10::optional<at::Tensor>&, bool, const c10::optional<at::Tensor>&, double,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, w_hr, has_bias, y, saved, grad_y, grad_h_n,
                 grad_c_n, need_input_grad, w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn compiled ops (registered as torch.ops.fused_rnn)";
  // The overrides' environment variables, read now: a value that is not valid stops the import.
  fused_rnn::override_values();
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

  // The constants of cells.h and layer_cpu.h, for fused_rnn/_ops.py and the tests.
  m.attr("CELL_IDS") = py::dict("LSTM"_a = static_cast<int64_t>(CellKind::LSTM),
                                "GRU"_a = static_cast<int64_t>(CellKind::GRU),
                                "RNN_TANH"_a = static_cast<int64_t>(CellKind::RNN_TANH),
                                "RNN_RELU"_a = static_cast<int64_t>(CellKind::RNN_RELU));
  py::dict gates, saved;
  for (const CellKind kind : {CellKind::LSTM, CellKind::GRU, CellKind::RNN_TANH, CellKind::RNN_RELU}) {
    fused_rnn::LayerShape s;
    fused_rnn::describe_cell(s, static_cast<int64_t>(kind));
    gates[py::int_(static_cast<int64_t>(kind))] = s.gates;
    saved[py::int_(static_cast<int64_t>(kind))] = s.saved_per_unit;
  }
  m.attr("GATES") = gates;           // gate blocks of W_ih / W_hh per cell id
  m.attr("SAVED_PER_UNIT") = saved;  // values saved for backward per hidden unit
  m.attr("LAYER_NORM_STATS") = fused_rnn::LayerShape::kLayerNormStats;  // statistics saved per row (layer norm)
  m.attr("INT8_GROUP_ROWS") = fused_rnn::kInt8GroupRows;  // the int8 panels: rows per group,
  m.attr("INT8_QUAD") = fused_rnn::kInt8Quad;             //   k per quad,
  m.attr("INT8_PANEL_BYTES") = fused_rnn::kInt8PanelBytes;  // bytes per (group, quad)

  m.def("overrides", &fused_rnn::overrides_by_name, "the overrides and their values, as (name, value) pairs");
  m.def("set_override", &fused_rnn::set_override, "set one override by name (ValueError when not valid)");
  m.def("override_choices", &fused_rnn::override_choices,
        "for each word-valued override, the values this CPU and build can run");
  m.def("_overrides_address", [] { return reinterpret_cast<uintptr_t>(&fused_rnn::override_values()); },
        "the overrides' store, for the emulated CUDA module (fused_rnn.testing)");
  m.def("cpu_plan", &cpu_plan, "the kernels of a padded CPU call: (product, kernel) pairs", py::arg("pass_"),
        py::arg("cell"), py::arg("dtype"), py::arg("steps"), py::arg("batch"), py::arg("input_size"),
        py::arg("hidden_size"), py::arg("proj_size") = 0, py::arg("need_input_grad") = true);
#ifdef FUSED_RNN_WITH_CUDA
  m.def("cuda_plan", &cuda_plan, "the CUDA plan of a padded call on a GPU: (decision, choice) pairs",
        py::arg("backward"), py::arg("cell"), py::arg("dtype"), py::arg("steps"), py::arg("batch"),
        py::arg("input_size"), py::arg("hidden_size"), py::arg("proj_size"), py::arg("device"));
#endif
  m.def("layer_forward_below_autograd", &layer_forward_below_autograd,
        "torch.ops.fused_rnn.layer_forward below autograd (fused_rnn/functional.py's plain eager calls)",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_backward_below_autograd", &layer_backward_below_autograd,
        "torch.ops.fused_rnn.layer_backward below autograd (fused_rnn/functional.py's plain eager calls)",
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_cache_bytes", &fused_rnn::cpu_cache_bytes, "bytes of freed CPU blocks kept for reuse");
  m.def("empty_cpu_cache", &fused_rnn::empty_cpu_cache, "gives the kept CPU blocks back to the system");
}
