"""Test set-up: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is decided here, first.
"""
import os
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


def pytest_report_header(config):
    return (f"spinalkern tests: torch {torch.__version__}, CUDA available: {HAS_CUDA}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
