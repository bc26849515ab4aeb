"""Builds fused_rnn._C: a CUDA extension when torch has CUDA and nvcc is found, else CPU only.

Install with `pip install --no-build-isolation .` so that the extension is built against the torch
that will import it (build isolation would fetch another torch into a temporary environment).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("fused_rnn: torch is not installed. Install torch first, then "
             "`pip install --no-build-isolation .` (see README.md).")

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """CUDA_HOME for nvcc, or None. /usr/local/bin/nvcc may be a wrapper script, from which torch
    would guess CUDA_HOME=/usr/local; prefer the real toolkit folder when it exists."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def want_cuda():
    if os.environ.get("FUSED_RNN_FORCE_CPU", "0") == "1" or torch.version.cuda is None:
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("fused_rnn: torch has CUDA but nvcc was not found: building the CPU-only extension")
        return False
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # read at import time, so set it on the module too
    return True


def cuda_include_dirs():
    """A cut-down toolkit may lack the cuBLAS/cuSPARSE headers that torch's CUDA headers include;
    the nvidia wheels that come with CUDA torch carry them."""
    dirs = []
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cublas/include",
                    "nvidia/cusparse/include"):
            d = os.path.join(sp, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def cpu_vector_flags():
    """AVX2+FMA for the CPU loops when the building machine has them (x86-64 Linux), so that the
    cells' vector Math (at::vec) runs 8 floats at a time. The extension is built from source on the
    machine that runs it; FUSED_RNN_PORTABLE=1 builds for any x86-64 (scalar gate math)."""
    if os.environ.get("FUSED_RNN_PORTABLE", "0") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if "avx2" in flags and "fma" in flags:
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]
    return []


def make_extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: cpp_extension adds the standard the installed torch needs (C++17 up to torch
    # 2.12 or so, C++20 for torch 2.14, whose ATen.h refuses anything older); nvcc takes only one.
    cxx_flags = ["-O3"] + cpu_vector_flags()
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template over `#pragma omp parallel`: without -fopenmp it
        # compiles to a serial loop in our code. libgomp resolves to the copy torch has loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(HERE, "csrc")]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # With no GPU to ask, cpp_extension needs the list: A100 (8.0) and H100/H200 (9.0).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        nvcc_flags = ["-O3", "-lineinfo",
                      "-DFUSED_RNN_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            name="fused_rnn._C",
            sources=cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs + cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_RNN_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        name="fused_rnn._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
