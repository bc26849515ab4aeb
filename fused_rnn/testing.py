"""Testing aids. Not for production use.

`emulate_cuda()` runs fused_rnn's CUDA path without a GPU: while it is active, fused_rnn's layers and
cells called on CPU tensors take the CUDA half of the compiled ops instead of the CPU one. That is
the same host code as on a GPU (csrc/cuda/ops_cuda.cpp: the input projection, the folded biases,
the choice of kernel and loop, the step tables, the products after the backward loop) and the same
kernels (csrc/cuda/*.cu), compiled for the CPU over an emulation of CUDA's threads, blocks, shared
memory, barriers, cooperative grids and the tensor cores' warp-wide instructions
(csrc/cuda_emulation/). The matrix products that cuBLAS does on a GPU are ATen's on the CPU. So
every dtype the CUDA path takes (float32 exactly, or as TF32 while
`torch.backends.cudnn.allow_tf32` is set; float64; float16 and bfloat16 on the tensor cores),
packed and padded input, both directions, the projection, the per-step and the persistent kernels,
forward and backward, run and can be checked against torch.nn on the CPU.

What it cannot tell: speed, the GPU's memory ordering, the tensor cores' own order of summation,
cuBLAS's TF32 (`torch.backends.cuda.matmul.allow_tf32`: the emulation's products are exact float32)
and real occupancy (bench/GPU_NOTES.md lists what stays GPU-only).

The emulation is compiled on first use (about a minute on 2 cores; then kept in the checkout's
build/ folder and rebuilt only where a source changed), from the sources of a fused_rnn checkout
(an editable install, `pip install -e .`), with the C++ compiler that torch's cpp_extension takes
($CXX, else c++). `FUSED_RNN_EMULATE_CUDA=1` in the environment starts it when fused_rnn is
imported, for the whole process: then a test suite written for the CPU runs through the CUDA path.
It is process-wide while active: every thread's calls take the CUDA path (each host thread runs its
own launches).
"""
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from . import _ops  # the ops' schemas, which the emulation implements

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_CHECKOUT, "csrc")
# The CUDA half compiled for the CPU: the ops' contract, the host code, the loops and kernels, and the
# emulated device with the module's bindings.
_SOURCES = ["layer.cpp", "cuda/ops_cuda.cpp", "cuda_emulation/forward_emulated.cpp",
            "cuda_emulation/backward_emulated.cpp", "cuda_emulation/device_emulated.cpp"]

_module = None


def _emulation():
    """The compiled emulation, built on first use with torch.utils.cpp_extension in the checkout's
    build/ folder (again only where a source or header changed)."""
    global _module
    if _module is None:
        missing = [s for s in _SOURCES if not os.path.isfile(os.path.join(_CSRC, s))]
        if missing:
            raise RuntimeError(
                "fused_rnn.testing.emulate_cuda() compiles fused_rnn's CUDA sources for the CPU, and needs a "
                f"source checkout of fused_rnn (an editable install: pip install -e .); {_CSRC} lacks "
                f"{', '.join(missing)}")
        from torch.utils import cpp_extension
        print("fused_rnn: loading the CUDA emulation (compiled on first use, about a minute)", file=sys.stderr,
              flush=True)
        # In the checkout's build/ (ignored by git), one folder per torch version: two checkouts, or
        # two torch builds, never share one.
        build = os.path.join(_CHECKOUT, "build", f"emulated_cuda-torch{torch.__version__.replace('+', '-')}")
        os.makedirs(build, exist_ok=True)
        module = cpp_extension.load(
            name="fused_rnn_emulated_cuda",
            sources=[os.path.join(_CSRC, s) for s in _SOURCES],
            extra_include_paths=[_CSRC],
            build_directory=build,
            # -O1: the emulated kernels build quickly and run fast enough for the tests. Warnings as
            # setup.py's build (torch's headers are -isystem here); FUSED_RNN_WERROR=1 (CI): none.
            extra_cflags=["-O1", "-DFUSED_RNN_EMULATED_CUDA", "-Wall", "-Wextra"]
            + (["-Werror"] if os.environ.get("FUSED_RNN_WERROR", "").strip() == "1" else []),
        )
        # One store of overrides (fused_rnn.overrides_set): the extension's, read by this module too.
        module.attach_overrides(_ops._C._overrides_address(), len(_ops._C.overrides()))
        _module = module
    return _module


@dataclass(frozen=True)
class EmulatedGpu:
    """The GPU that the emulation stands for: its multiprocessors (the kernels' cost model and the
    cooperative grids' capacity count them), its compute capability (the tensor-core kernels need
    8.0; below it the half types run in float32 throughout, as on such a GPU), and whether a grid's
    blocks run in descending order (blocks of one launch must not depend on each other's order)."""
    multiprocessors: int = 132
    compute_capability: Tuple[int, int] = (9, 0)
    blocks_descending: bool = False


class CudaEmulation:
    """What `emulate_cuda()` yields: the emulated GPU, and counts of what ran on it."""

    def __init__(self, module, gpu: EmulatedGpu):
        self._module, self.gpu = module, gpu
        self._start = module.launches()

    @property
    def launches(self) -> int:
        """Kernel launches emulated since the context was entered (a cooperative grid is one)."""
        return self._module.launches() - self._start

    def chosen_rows_per_block(self, kernel: str, cell: str, rows: int, hidden: int, proj: int = 0,
                              dtype: torch.dtype = torch.float32) -> int:
        """The cost model's pick on this GPU for one step of `rows` rows: the rows per block of the
        variant of kernel "forward" (CUDA cores), "tensor_core" (float16 W_hh) or "backward" (fused);
        FUSED_RNN_CUDA_ROWS_PER_BLOCK forces one, as on a GPU."""
        return self._module.chosen_rows_per_block(kernel, _ops.CELL_IDS[cell], rows, hidden, proj or hidden,
                                                  dtype == torch.float64)

    def plan(self, cell: str, dtype: torch.dtype = torch.float32, batch: int = 1, input_size: int = 1,
             hidden_size: int = 1, proj_size: int = 0, steps: int = 1, backward: bool = False) -> dict:
        """The CUDA plan (csrc/cuda/cuda_plan.h) of a padded call on this emulated GPU, with the
        current overrides: decision -> choice."""
        return dict(self._module.cuda_plan(backward, _ops.CELL_IDS[cell], dtype, steps, batch, input_size,
                                           hidden_size, proj_size))

    def takes_persistent_kernel(self, kernel: str, cell: str, batch: int, hidden: int, proj: int = 0,
                                dtype: torch.dtype = torch.float32) -> bool:
        """Whether a padded layer takes the persistent kernel on this GPU: kernel "forward" or
        "backward" on the CUDA cores (float32 or float64), or the forward on the tensor cores,
        "float16", "bfloat16", "tf32" (FUSED_RNN_CUDA_PERSISTENT included, as on a GPU)."""
        return self._module.persistent_chosen(kernel, _ops.CELL_IDS[cell], batch, hidden, proj,
                                              dtype == torch.float64)


_active: List[CudaEmulation] = []  # the active contexts' emulations, innermost last


def _configure(module, gpu: EmulatedGpu) -> None:
    major, minor = gpu.compute_capability
    module.configure(gpu.multiprocessors, major * 10 + minor, gpu.blocks_descending)


def _push(emulation: CudaEmulation, innermost: bool = True) -> None:
    """Adds an active emulation (the CUDA half takes the CPU key with the first one) and emulates
    the innermost one's GPU."""
    if not _active:
        emulation._module.start()
    _active.insert(len(_active) if innermost else 0, emulation)
    _configure(emulation._module, _active[-1].gpu)


def _pop(emulation: CudaEmulation) -> None:
    """Removes an emulation; the CPU half gets its ops back with the last one."""
    _active[:] = [e for e in _active if e is not emulation]
    if _active:
        _configure(emulation._module, _active[-1].gpu)
    else:
        emulation._module.stop()


@contextlib.contextmanager
def emulate_cuda(multiprocessors: int = 132, compute_capability: Tuple[int, int] = (9, 0),
                 blocks_descending: bool = False) -> Iterator[CudaEmulation]:
    """While active, fused_rnn's layers and cells on CPU tensors take the CUDA path, on an emulated
    GPU (an H100's numbers by default; see EmulatedGpu). For tests: see this module's docstring.

        with fused_rnn.testing.emulate_cuda() as gpu:
            output, (h_n, c_n) = fused_rnn.LSTM(8, 16)(torch.randn(5, 3, 8))
        assert gpu.launches > 0

    Contexts nest; the innermost one's GPU is emulated. Call backward inside the context too, for
    the backward to take the CUDA path."""
    emulation = CudaEmulation(_emulation(), EmulatedGpu(multiprocessors, tuple(compute_capability),
                                                        blocks_descending))
    _push(emulation)
    try:
        yield emulation
    finally:
        _pop(emulation)


def emulating_cuda() -> bool:
    """Whether fused_rnn's ops on CPU tensors take the CUDA path now (emulate_cuda() or
    FUSED_RNN_EMULATE_CUDA=1)."""
    return bool(_active)


def emulated_launches() -> Optional[int]:
    """Kernel launches emulated in this process so far, or None where the emulation was never loaded."""
    return None if _module is None else _module.launches()


def _emulate_for_the_process() -> None:
    """FUSED_RNN_EMULATE_CUDA=1: the emulation started at import, the outermost one, never stopped."""
    _push(CudaEmulation(_emulation(), EmulatedGpu()), innermost=False)
