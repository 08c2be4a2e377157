"""Builds spinalkern's C++/CUDA extension ``spinalkern._C`` (package metadata: pyproject.toml).

    python setup.py build_ext --inplace          # or: pip install --no-build-isolation -e .

The CUDA kernels are built whenever nvcc and a CUDA build of torch are present, also on a
machine without a GPU; otherwise the extension holds the C++ CPU ops only.  Knobs
(environment variables):

    TORCH_CUDA_ARCH_LIST   GPU architectures; default "8.0;9.0+PTX" (SASS for sm_80 and
                           sm_90, and PTX that newer GPUs compile at load time) plus those of
                           the visible GPUs.  8.0 is the minimum (bf16 tensor cores).
    SPINALKERN_FORCE_CUDA=1   fail instead of building CPU-only when CUDA is not usable
    SPINALKERN_SKIP_CUDA=1    build the CPU-only extension
    SPINALKERN_PTXAS_VERBOSE=1  print ptxas register/spill reports while compiling
    MAX_JOBS               parallel compile jobs (default: the number of CPUs)
    CUDA_HOME              the CUDA toolkit (default: found from nvcc)

With pip, use --no-build-isolation: an isolated build environment would download and build
against a different torch than the one installed, and the extension would not load.
"""
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _log(msg):
    print(f"[spinalkern setup] {msg}", file=sys.stderr)


def _flag(name):
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the toolkit owning nvcc on PATH (a
    wrapper script on PATH is followed to the real nvcc)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:  # e.g. a shell wrapper `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for tok in head.decode(errors="ignore").split():
                if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                    nvcc = tok
                    break
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(nvcc))


# CUDA_HOME must be settled before torch.utils.cpp_extension is imported (it reads it once).
_cuda_home = _find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if "pip-build-env" in torch.__file__ or "build-env" in os.path.dirname(torch.__file__):
    _log("WARNING: building against the torch of an isolated pip build environment "
         f"({torch.__version__} at {torch.__file__}); the extension will only load with that "
         "exact torch. Use `pip install --no-build-isolation -e .`.")


def _use_cuda():
    if _flag("SPINALKERN_SKIP_CUDA"):
        _log("SPINALKERN_SKIP_CUDA set: building the CPU-only extension")
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if _cuda_home is None or not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        msg = "; ".join(problems)
        if _flag("SPINALKERN_FORCE_CUDA"):
            raise RuntimeError(f"SPINALKERN_FORCE_CUDA=1 but the CUDA build is impossible: {msg}")
        _log(f"building the CPU-only extension (no CUDA kernels): {msg}")
        return False
    return True


def _arch_list():
    """TORCH_CUDA_ARCH_LIST, defaulting to DEFAULT_ARCHS plus the architectures of the visible
    GPUs, if any (torch's own detection fails without a GPU); entries below 8.0 are dropped."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        found = DEFAULT_ARCHS.split(";")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                cap = "{}.{}".format(*torch.cuda.get_device_capability(i))
                if cap not in [a.split("+")[0] for a in found]:
                    found.append(cap)
        archs = ";".join(found)
    keep = []
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not a:
            continue
        try:
            major = float(a.split("+")[0].rstrip("aAfF"))
        except ValueError:
            keep.append(a)  # let torch interpret names it knows
            continue
        if major < 8.0:
            _log(f"dropping architecture {a}: the kernels need compute capability 8.0+")
        else:
            keep.append(a)
    if not keep:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={archs!r} has no architecture >= 8.0")
    return ";".join(keep)


def extensions():
    cxx = ["-O3", "-std=c++17", "-DSK_PYTHON_MODULE"]
    sources = ["csrc/spinal_head.cpp"]
    if not _use_cuda():
        return [CppExtension("spinalkern._C", sources, extra_compile_args={"cxx": cxx})]
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    _log(f"building the CUDA extension (CUDA_HOME={_cuda_home}, torch {torch.__version__}, "
         f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}, "
         f"MAX_JOBS={os.environ['MAX_JOBS']})")
    nvcc = ["-O3", "-std=c++17", "-DSK_PYTHON_MODULE",
            "--expt-relaxed-constexpr", "-Xptxas=--warn-on-spills"]
    if _flag("SPINALKERN_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    return [CUDAExtension(
        "spinalkern._C",
        sources + ["csrc/spinal_head_forward.cu", "csrc/spinal_head_backward.cu"],
        define_macros=[("SK_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
