"""spinalkern: fused Triton and CUDA kernels for SpinalNet-style classifier heads."""
from ._backends import available_backends
from .compat import load_original_state_dict
from .modules import ProgressiveHead, SpinalHead, fused_head
from .reference import reference_forward
from .spec import HeadSpec
from .transfer import replace_classifier
from . import triton_head  # noqa: F401  registers spinalkern::triton_head_* (needs torch only)
from . import cuda_backend  # noqa: F401  registers spinalkern::cuda_head_* when _C is built

__all__ = ["SpinalHead", "ProgressiveHead", "HeadSpec", "reference_forward",
           "available_backends", "load_original_state_dict", "fused_head", "replace_classifier"]
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
