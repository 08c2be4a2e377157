"""spinalkern: fused Triton and CUDA kernels for SpinalNet-style classifier heads."""
from ._backends import available_backends, names as backend_names
from .compat import load_original_state_dict
from .modules import ProgressiveHead, SpinalHead, fused_head
from .reference import reference_forward
from .spec import HeadSpec
from .transfer import replace_classifier
# The backends register themselves in spinalkern._backends when imported (in this order, which
# is also the order of backend_names()).
from . import triton_head  # noqa: F401  backend "triton": spinalkern::triton_head_* ops
from . import cuda_backend  # noqa: F401  backend "cuda": spinalkern::cuda_head_* when _C is built

__all__ = ["SpinalHead", "ProgressiveHead", "HeadSpec", "reference_forward",
           "available_backends", "backend_names", "load_original_state_dict", "fused_head",
           "replace_classifier"]
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
