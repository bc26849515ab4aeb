"""Shared pytest setup for the CUDA path's emulated stage.

Under FUSED_RNN_EMULATE_CUDA=1 (a stage of .ci/run) fused_rnn's ops on CPU tensors take the CUDA
path (fused_rnn.testing), so that the CPU suite's parity, packed, dtype and gradcheck tests check
it against torch.nn. Then float32 is exact, as tests/test_cuda.py sets it on a GPU (else the
recurrent product would take TF32, as cuDNN's does by default), and the tests marked cpu_only
(complex types, which the CUDA path refuses) are skipped. The summary says how many kernel
launches the emulation ran.
"""
import pytest
import torch

import fused_rnn
from fused_rnn import testing


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: needs the CPU half (complex types), skipped on the CUDA path")


def pytest_collection_modifyitems(config, items):
    if testing.emulating_cuda():
        skip = pytest.mark.skip(reason="complex types run on the CPU only; the CUDA path refuses them")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _exact_float32_on_the_cuda_path():
    if not testing.emulating_cuda():
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if testing.emulating_cuda():
        terminalreporter.write_line(f"fused_rnn: {testing.emulated_launches()} kernel launches emulated "
                                    "(the CUDA path)")



@pytest.fixture(autouse=True)
def _overrides_restored():
    """A test may set fused_rnn's overrides (docs/kernels.md); the next one starts from the values before."""
    before = fused_rnn.overrides()
    yield
    fused_rnn.set_overrides(**before)


@pytest.fixture
def exact_float32():
    """float32 exactly on the CUDA path (cuDNN's policy, which it follows, would take TF32)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old
