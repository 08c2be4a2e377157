"""Test set-up: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is decided here, first.
"""
import os
import re
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(min(4, os.cpu_count() or 1))

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (runs on the GPU machine)")

# Where the Triton backend runs its kernels in this test run.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_emulator = None


def load_emulator():
    """The CUDA kernels and their host code compiled against the CPU emulator (csrc/emu; built
    once, cached in build/emu), registered as the test backend "emu": the ops
    ``spinalkern::emu_head_{forward,backward,bn_forward,bn_backward}`` get the fake and
    Python autograd implementations every backend shares (spinalkern.ops), so the conformance
    suite runs on them like on any backend.  Returns a namespace of those ops and the
    emulator's tools (keep_mask, launch_plan, set_fault)."""
    global _emulator
    if _emulator is None:
        import types

        from torch.utils import cpp_extension

        from spinalkern import ops
        build_dir = os.path.join(ROOT, "build", "emu")
        os.makedirs(build_dir, exist_ok=True)
        cpp_extension.load(
            name="spinalkern_emu", sources=[os.path.join(ROOT, "csrc", "emu", "emu_ops.cpp")],
            extra_cflags=["-O2", "-std=c++17", "-Wno-unknown-pragmas"],
            build_directory=build_dir, is_python_module=False, verbose=False)
        ops.register_fakes("emu")
        ops.register_python_autograd("emu")
        ops.register_bn_fakes("emu")
        ops.register_python_bn_autograd("emu")
        sk, tools = torch.ops.spinalkern, torch.ops.spinalkern_emu
        _emulator = types.SimpleNamespace(
            head_forward=sk.emu_head_forward, head_backward=sk.emu_head_backward,
            head_bn_forward=sk.emu_head_bn_forward, head_bn_backward=sk.emu_head_bn_backward,
            keep_mask=tools.keep_mask, launch_plan=tools.launch_plan, set_fault=tools.set_fault)
    return _emulator


# A skipif reason that starts like this marks a test that needs a GPU: "needs CUDA",
# "needs a CUDA GPU ...", "needs a GPU ...".
NEEDS_GPU = re.compile(r"^needs (a )?(CUDA|GPU)\b")


def needs_gpu_reason(item) -> str | None:
    """The reason of a skipif mark on ``item`` that says it needs a GPU, if any."""
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if NEEDS_GPU.match(reason):
            return reason
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU; skipped without one (the GPU runbook runs "
                   "`pytest -m gpu`). Added to every test with a skipif whose reason starts "
                   "with 'needs CUDA' or 'needs a CUDA GPU'.")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_gpu_reason(item) is not None:
            item.add_marker(pytest.mark.gpu)


def pytest_report_header(config):
    return (f"spinalkern tests: torch {torch.__version__}, CUDA available: {HAS_CUDA}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


# -- the training command line's tests (test_cli.py, test_train.py) ---------------------------------
SHARED = os.environ.get("SPINALKERN_DATA", os.path.join(ROOT, "..", "shared", "data"))
needs_mnist = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "mnist")),
                                 reason="shared MNIST not found")
CLI_CPU = ["--device", "cpu", "--threads", "1", "--data-root", SHARED, "--progress", "off"]


@pytest.fixture
def keep_threads():
    """Restores torch's thread count after a test (a training run sets it from --threads)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_cli(tmp_path, *args):
    """A training run from command-line arguments, on CPU (CLI_CPU), writing under tmp_path."""
    from models.training.cli import parse_args
    from models.training.runs import run_all
    return run_all(parse_args([*CLI_CPU, "--out", str(tmp_path), *args]))
