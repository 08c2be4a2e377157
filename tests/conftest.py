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

# Where the Triton backend runs its kernels in this session.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


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
