"""The overrides (csrc/overrides.h) and the CPU kernel plan (csrc/cpu/kernel_plan.h): names and
values checked with clear errors, set at run time and restored, read from the environment at import,
and the plan's rules as properties of what it picks."""
import os
import subprocess
import sys

import pytest
import torch

import fused_rnn

FLOAT_KERNELS = fused_rnn.override_choices()["float_kernel"]


def test_every_override_has_a_value():
    assert set(fused_rnn.overrides()) == {"float_kernel", "chunk_gemm", "int8_kernel", "amx_step_rows",
                                          "cpu_cache_mb", "cuda_persistent", "cuda_unfused_backward",
                                          "cuda_rows_per_block"}


def test_unknown_name_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="no override named 'float_kernels'; the overrides are float_kernel, "):
        fused_rnn.set_overrides(float_kernels="avx2")


def test_unknown_word_is_refused_with_the_valid_ones():
    before = fused_rnn.overrides()
    with pytest.raises(ValueError, match="float_kernel='sse' is not valid; it must be one of auto, amx, avx512, avx2"):
        fused_rnn.set_overrides(float_kernel="sse")
    with pytest.raises(ValueError, match="cuda_rows_per_block='four' is not valid; it must be a whole number from 0"):
        fused_rnn.set_overrides(cuda_rows_per_block="four")
    with pytest.raises(ValueError, match="amx_step_rows=' 16' is not valid"):
        fused_rnn.set_overrides(amx_step_rows=" 16")
    assert fused_rnn.overrides() == before  # nothing changed


def test_set_overrides_is_all_or_nothing():
    before = fused_rnn.overrides()
    with pytest.raises(ValueError, match="no override named 'bogus'"):
        fused_rnn.set_overrides(amx_step_rows=3, bogus=1)
    assert fused_rnn.overrides() == before
    with fused_rnn.overrides_set(cuda_unfused_backward=True) as inside:
        assert inside["cuda_unfused_backward"] == "1"


def test_a_lower_cache_limit_gives_the_blocks_back():
    layer = fused_rnn.LSTM(128, 128)
    layer(torch.randn(40, 32, 128))
    assert fused_rnn.cpu_cache_bytes() > 0
    with fused_rnn.overrides_set(cpu_cache_mb=0):
        assert fused_rnn.cpu_cache_bytes() == 0


@pytest.mark.skipif("amx" in FLOAT_KERNELS, reason="this CPU has AMX")
def test_a_kernel_this_cpu_lacks_is_refused():
    with pytest.raises(ValueError, match="float_kernel='amx' asks for a kernel this CPU"):
        fused_rnn.set_overrides(float_kernel="amx")


def test_overrides_set_restores_the_values_before():
    before = fused_rnn.overrides()
    with fused_rnn.overrides_set(amx_step_rows=3, cuda_persistent="0") as inside:
        assert inside["amx_step_rows"] == "3" and inside["cuda_persistent"] == "0"
        assert fused_rnn.overrides()["amx_step_rows"] == "3"
    assert fused_rnn.overrides() == before
    with pytest.raises(RuntimeError, match="inside"):
        with fused_rnn.overrides_set(amx_step_rows=5):
            raise RuntimeError("inside")
    assert fused_rnn.overrides() == before


@pytest.mark.parametrize("pass_", ["forward", "backward"])
@pytest.mark.parametrize("float_kernel", FLOAT_KERNELS)
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_the_plan_follows_the_float_kernel(float_kernel, batch, pass_):
    """What each choice promises: avx2 takes no AVX-512 or AMX kernel; avx512 no AMX; a batch of one
    on AVX-512 reads W_hh's rows as they are; float64 takes the at::vec tiles and BLAS whatever the
    float32 kernel."""
    with fused_rnn.overrides_set(float_kernel=float_kernel):
        plan = fused_rnn.cpu_plan("GRU", torch.float32, batch, 24, 40, pass_=pass_)
        double = fused_rnn.cpu_plan("GRU", torch.float64, batch, 24, 40, pass_=pass_)
    kernels = [k for name, k in plan.items() if name != "cells"]
    if float_kernel == "avx2":
        assert not any("AVX-512" in k or "AMX" in k for k in kernels) and plan["cells"] == "at::vec"
    if float_kernel == "avx512":
        assert "AMX" not in kernels and any("AVX-512" in k for k in kernels)
    if float_kernel in ("auto", "avx512") and "avx512" in FLOAT_KERNELS and pass_ == "forward" and batch == 1:
        assert plan["h·W_hhᵀ"] == "AVX-512 row dots"
    assert all("AVX-512" not in k and "AMX" not in k for k in double.values())
    assert double["cells"] == "at::vec"


def test_backward_without_input_gradient_plans_no_dx():
    assert fused_rnn.cpu_plan("LSTM", batch=8, input_size=16, hidden_size=16, pass_="backward",
                              need_input_grad=False)["dX"] == "none"
    assert fused_rnn.cpu_plan("LSTM", batch=8, input_size=16, hidden_size=16, pass_="backward")["dX"] != "none"


def test_the_chunk_gemm_override_decides_the_weight_gradients():
    if "avx512" not in FLOAT_KERNELS:
        pytest.skip("no AVX-512 tiles here: the weight gradients take BLAS")
    for choice, kernel in (("tiles", "AVX-512 tiles"), ("blas", "BLAS")):
        with fused_rnn.overrides_set(chunk_gemm=choice):
            assert fused_rnn.cpu_plan("RNN_TANH", batch=8, input_size=8, hidden_size=8, pass_="backward")["dW"] == kernel


def test_int8_auto_takes_the_best_kernel_this_cpu_has():
    choices = fused_rnn.override_choices()["int8_kernel"]
    best = {"vnni": "int8 AVX512-VNNI", "avx2": "int8 AVX2", "scalar": "int8 scalar"}
    expected = next(best[c] for c in ("vnni", "avx2", "scalar") if c in choices)
    assert fused_rnn.cpu_plan("LSTM", batch=4, input_size=8, hidden_size=8, pass_="int8")["products"] == expected


def _import_with(env):
    script = "import fused_rnn; print(fused_rnn.overrides()['float_kernel'], fused_rnn.overrides()['cpu_cache_mb'])"
    return subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300)


def test_the_environment_sets_the_starting_values():
    """FUSED_RNN_<NAME> is read once, at import (the one place csrc reads the environment), and a
    value that is not valid stops the import with the valid ones named."""
    word = FLOAT_KERNELS[-1]
    done = _import_with({"FUSED_RNN_FLOAT_KERNEL": word, "FUSED_RNN_CPU_CACHE_MB": "12"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [word, "12"]
    done = _import_with({"FUSED_RNN_FLOAT_KERNEL": "fastest"})
    assert done.returncode != 0
    assert ("ValueError: fused_rnn: FUSED_RNN_FLOAT_KERNEL='fastest' is not valid; it must be one of auto, amx, "
            "avx512, avx2") in done.stderr
    assert "Build it against the installed torch" not in done.stderr  # not mistaken for a build problem
