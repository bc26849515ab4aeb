"""Builds fused_rnn._C, CPU only or with the CUDA kernels (docs/build.md):

- CUDA when torch has CUDA, nvcc is found and either a GPU is visible (built for that GPU's
  architecture only) or FUSED_RNN_CUDA=1 / TORCH_CUDA_ARCH_LIST asks for it (CI does, so the CUDA
  sources compile in every CI run; without a GPU the architectures default to 8.0 and 9.0+PTX).
- CPU only otherwise, or with FUSED_RNN_FORCE_CPU=1 (or FUSED_RNN_CUDA=0).

It says what it builds and about how long that takes before it starts, and prints a line every
30 s while it runs (`pip install -v` shows them; pip hides a build's output without -v).

Install with `pip install --no-build-isolation .` so that the extension is built against the torch
that will import it (build isolation would fetch another torch into a temporary environment).
"""
import glob
import os
import shutil
import sys
import threading
import time

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("fused_rnn: torch is not installed. Install torch first, then "
             "`pip install --no-build-isolation .` (see README.md).")

HERE = os.path.dirname(os.path.abspath(__file__))
# Compile time of the sources, measured on the 2-core VM (torch 2.13/2.14): for the announcement.
CPP_CORE_SECONDS = 150  # all of csrc/*.cpp and csrc/cpu/*.cpp together
CU_CORE_SECONDS_PER_ARCH = 40  # one csrc/cuda/*.cu file for one architecture


def find_cuda_home():
    """CUDA_HOME for nvcc, or None. /usr/local/bin/nvcc may be a wrapper script, from which torch
    would guess CUDA_HOME=/usr/local; prefer the real toolkit folder when it exists."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def flag(name):
    return os.environ.get(name, "").strip()


def cuda_wanted():
    """(build the CUDA kernels?, why): printed before the build starts."""
    if flag("FUSED_RNN_FORCE_CPU") == "1" or flag("FUSED_RNN_CUDA") == "0":
        return False, "FUSED_RNN_FORCE_CPU=1" if flag("FUSED_RNN_FORCE_CPU") == "1" else "FUSED_RNN_CUDA=0"
    asked = flag("FUSED_RNN_CUDA") == "1" or bool(flag("TORCH_CUDA_ARCH_LIST"))
    if torch.version.cuda is None:
        if asked:
            sys.exit(f"fused_rnn: a CUDA build was asked for, but torch {torch.__version__} has no CUDA")
        return False, f"torch {torch.__version__} is a CPU build"
    if not asked and not torch.cuda.is_available():
        return False, "no GPU is visible (FUSED_RNN_CUDA=1 builds the CUDA kernels anyway)"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if asked:
            sys.exit("fused_rnn: a CUDA build was asked for, but nvcc was not found (set CUDA_HOME)")
        return False, "torch has CUDA but nvcc was not found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # read at import time, so set it on the module too
    if not flag("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            # Only the visible GPUs' architectures: each one is a full nvcc pass over every kernel.
            caps = sorted({torch.cuda.get_device_capability(d) for d in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            # With no GPU to ask, cpp_extension needs the list: A100 (8.0) and H100/H200 (9.0).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    why = "FUSED_RNN_CUDA=1" if flag("FUSED_RNN_CUDA") == "1" else (
        "TORCH_CUDA_ARCH_LIST is set" if asked else "a GPU is visible")
    return True, why


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


def warning_flags():
    """(C++ flags, nvcc flags) for warnings: -Wall -Wextra on our sources (nvcc: its host compiler's),
    torch's headers as system headers (-isystem: their warnings, such as ATen's `#pragma unroll`, are
    not ours to fix; the same headers are found). FUSED_RNN_WERROR=1 (.ci/run sets it) makes every
    warning an error: opt-in, so that a user's install never fails on a new compiler's new warning."""
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    isystem = ["-isystem", torch_include, "-isystem", os.path.join(torch_include, "torch", "csrc", "api", "include")]
    werror = flag("FUSED_RNN_WERROR") == "1"
    cxx = ["-Wall", "-Wextra"] + isystem + (["-Werror"] if werror else [])
    nvcc = ["-Xcompiler", "-Wall,-Wextra"] + isystem + (["-Werror", "all-warnings", "-Xcompiler", "-Werror"] if werror else [])
    return cxx, nvcc


def build_jobs():
    """ninja's parallel jobs: MAX_JOBS, else ninja's own default (cores + 2)."""
    return int(flag("MAX_JOBS")) if flag("MAX_JOBS").isdigit() else (os.cpu_count() or 1) + 2


def announcement(cpp_sources, cuda_sources, why):
    """What is built and about how long it takes (from the compile times measured on the 2-core VM)."""
    cores = os.cpu_count() or 1
    if cuda_sources:
        arches = [a for a in flag("TORCH_CUDA_ARCH_LIST").replace(",", ";").replace(" ", ";").split(";") if a]
        kernels = [f for f in cuda_sources if f.endswith(".cu")]
        host = len(cuda_sources) - len(kernels)  # the CUDA half's C++, priced as the other C++ files
        seconds = (CPP_CORE_SECONDS * (len(cpp_sources) + host) / len(cpp_sources)
                   + CU_CORE_SECONDS_PER_ARCH * len(arches) * len(kernels)) / min(cores, build_jobs())
        what = (f"the CUDA extension ({why}): {len(cpp_sources) + host} C++ and "
                f"{len(kernels)} CUDA files for compute capability {', '.join(arches)}")
    else:
        seconds = CPP_CORE_SECONDS / min(cores, build_jobs(), len(cpp_sources))
        what = f"the CPU-only extension ({why}): {len(cpp_sources)} C++ files"
    return f"fused_rnn: building {what}; about {max(1, round(seconds / 60))} min on {cores} cores"


class Heartbeat:
    """A line every 30 s while the compilers run, so that a long build is never silent."""

    def __init__(self, period=30):
        self.period, self.done = period, threading.Event()

    def __enter__(self):
        start = time.monotonic()

        def beat():
            while not self.done.wait(self.period):
                print(f"fused_rnn: still compiling ({time.monotonic() - start:.0f} s)", flush=True)
        threading.Thread(target=beat, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()


class BuildWithProgress(cpp_extension.BuildExtension):
    announcement = ""

    def build_extensions(self):
        print(self.announcement, flush=True)
        start = time.monotonic()
        with Heartbeat():
            super().build_extensions()
        print(f"fused_rnn: extension built in {time.monotonic() - start:.0f} s", flush=True)


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
    with_cuda, why = cuda_wanted()
    cxx_warnings, nvcc_warnings = warning_flags()
    cxx_flags += cxx_warnings
    # The CUDA half: its kernels (.cu, nvcc) and its host code (.cpp, the host compiler).
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")) if with_cuda else []
    BuildWithProgress.announcement = announcement(cpp_sources, cuda_sources, why)
    if with_cuda:
        nvcc_flags = ["-O3", "-lineinfo",
                      "-DFUSED_RNN_WITH_CUDA"] + nvcc_warnings
        return cpp_extension.CUDAExtension(
            name="fused_rnn._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs + cuda_include_dirs(),
            # The architectures as built, for `python -m fused_rnn` (bindings.cpp).
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_RNN_WITH_CUDA",
                                                    f'-DFUSED_RNN_CUDA_ARCHS="{flag("TORCH_CUDA_ARCH_LIST")}"'],
                                "nvcc": nvcc_flags},
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
    cmdclass={"build_ext": BuildWithProgress.with_options(use_ninja=True)},
)
