"""What the CUDA kernels compile to, without a GPU: per kernel, registers, shared memory and spills
(ptxas -v) and how the staging loads are issued (read from the SASS).

    python -m bench.sass_report                  # sm_90, every csrc/cuda/*.cu, all kernels
    python -m bench.sass_report --arch 80 --filter forward_step

Each .cu file is compiled on its own to a cubin (nvcc -cubin, the extension's flags), then
`cuobjdump --dump-sass` (the triton package of a CUDA torch build carries one) gives the
instructions. "in flight" is the most global loads (LDG) a kernel issues in a row before a
shared-memory store (STS) or any other use of their registers makes it wait, counted for the
16-byte loads (the weight staging) and for loads of any width: 1 means every load waits out its
whole memory round trip before the next one issues; the register-staged chunks of step_loops.cuh
issue a whole chunk's loads back to back.

Needs nvcc (CUDA_HOME or /usr/local/cuda) and a CUDA build of torch (for its headers); prints the
table and returns 0, or says what is missing and returns 2.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name, *candidates):
    for path in candidates:
        if path and os.path.exists(path):
            return path
    return shutil.which(name)


def find_tools():
    import torch
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = _tool("nvcc", os.path.join(cuda_home, "bin", "nvcc"))
    triton_bin = None
    try:
        import triton
        triton_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    except ImportError:
        pass
    cuobjdump = _tool("cuobjdump", os.path.join(cuda_home, "bin", "cuobjdump"),
                      triton_bin and os.path.join(triton_bin, "cuobjdump"))
    return torch, nvcc, cuobjdump


def include_dirs(torch):
    from torch.utils import cpp_extension
    dirs = cpp_extension.include_paths(device_type="cuda") if "device_type" in \
        cpp_extension.include_paths.__code__.co_varnames else cpp_extension.include_paths(cuda=True)
    dirs += [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    for sp in sys.path:  # cuBLAS headers of the nvidia wheels (a cut-down toolkit lacks them)
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cublas/include"):
            if os.path.isdir(os.path.join(sp, sub)):
                dirs.append(os.path.join(sp, sub))
    return dirs


def compile_cubin(nvcc, torch, source, arch, out_dir):
    cubin = os.path.join(out_dir, os.path.basename(source) + f".sm_{arch}.cubin")
    cmd = [nvcc, "-cubin", "-o", cubin, source, f"-arch=sm_{arch}", "-O3", "-std=c++20", "-Xptxas", "-v",
           "-DFUSED_RNN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    cmd += [f"-I{d}" for d in include_dirs(torch)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{run.stderr[-4000:]}")
    return cubin, run.stderr


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def ptxas_resources(log):
    """{mangled kernel: {registers, smem, spill_stores, spill_loads}} from ptxas -v."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": 0, "smem": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            current["smem"] = int(m.group(1))
    return kernels


def sass_by_kernel(cuobjdump, cubin):
    out = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    kernels, current = {}, None
    for line in out.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and re.search(r"/\*[0-9a-f]{4}\*/", line):
            current.append(line.split("*/", 1)[1].strip().rstrip(";").strip())
    return kernels


def loads_in_flight(instructions, wide_only=False):
    """The longest run of global loads (only the 16-byte ones, LDG.E.128, with wide_only: the
    weight staging) issued before any instruction reads one of their destination registers (a
    store of them to shared memory, arithmetic, ...)."""
    best, pending = 0, []
    for ins in instructions:
        body = re.sub(r"^@!?U?P\w+\s+", "", ins)
        op = body.split(" ", 1)[0]
        operands = body.split(" ", 1)[1] if " " in body else ""
        regs_read = set(re.findall(r"\bR(\d+)\b", operands.split(",", 1)[1] if op.startswith(("LDG", "LD.")) and
                                   "," in operands else operands))
        if pending and any(r in regs_read for dst in pending for r in dst):
            best, pending = max(best, len(pending)), []
        if op.startswith("LDG") and (not wide_only or op.endswith(".128")):
            m = re.match(r"R(\d+)", operands)
            if m:
                width = {"128": 4, "64": 2}.get(op.rsplit(".", 1)[-1], 1)
                pending.append({str(int(m.group(1)) + i) for i in range(width)})
    return max(best, len(pending))


def _opcode(instruction):
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split(" ", 1)[0]


def short_name(demangled):
    """`forward_step_kernel<LSTMCell<float>, 4>`: the kernel and its template arguments, without
    namespaces, return type and parameter list."""
    name = re.sub(r"fused_rnn::(\(anonymous namespace\)::)?", "", demangled)
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def report(arch, sources, name_filter):
    torch, nvcc, cuobjdump = find_tools()
    if not nvcc or not cuobjdump or torch.version.cuda is None:
        print("sass_report: needs nvcc, cuobjdump and a CUDA build of torch "
              f"(nvcc: {nvcc}, cuobjdump: {cuobjdump}, torch CUDA: {torch.version.cuda})")
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            cubin, log = compile_cubin(nvcc, torch, source, arch, tmp)
            resources = ptxas_resources(log)
            code = sass_by_kernel(cuobjdump, cubin)
            names = demangle(sorted(code))
            for mangled, instructions in sorted(code.items(), key=lambda kv: names[kv[0]]):
                pretty = names[mangled]
                if name_filter and name_filter not in pretty:
                    continue
                res = resources.get(mangled, {})
                rows.append((os.path.basename(source), pretty, res.get("registers", "?"), res.get("smem", "?"),
                             res.get("spill_stores", 0) + res.get("spill_loads", 0),
                             sum(i.split(" ", 1)[0].startswith("LDG") for i in instructions),
                             loads_in_flight(instructions, wide_only=True), loads_in_flight(instructions),
                             sum("HMMA" in i for i in instructions), sum("LDSM" in i for i in instructions),
                             sum(_opcode(i).startswith("LD.") for i in instructions)))
    print(f"sm_{arch}: registers, static shared memory (bytes), spill bytes (stores + loads), global loads "
          f"(LDG instructions), most 16-byte loads (the weight staging) and most loads of any width in flight, "
          f"HMMA, LDSM, and generic loads (LD: an address the compiler could not place in shared or global memory)")
    print("| file | kernel | regs | smem | spills | LDG | 16 B in flight | any in flight | HMMA | LDSM | LD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | `{short_name(row[1])}` | " + " | ".join(str(v) for v in row[2:]) + " |")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("sources", nargs="*", help="the .cu files (default: csrc/cuda/*.cu)")
    args = parser.parse_args(argv)
    sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return report(args.arch, sources, args.filter)


if __name__ == "__main__":
    sys.exit(main())
