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
against a different torch than the one installed, and the extension would not load.  Such a
build needs setuptools >= 77 in the environment.

The C++ standard is the one torch's BuildExtension uses for the installed torch (its headers
decide: C++17 for torch 2.11, newer releases need C++20), so it is never passed here.  What the
build used (torch, CUDA, architectures, flags) is written to spinalkern/_build_info.py beside
the extension; `python -m spinalkern.info` prints it.
"""
import os
import re
import shutil
import subprocess
import sys

import setuptools
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


MIN_SETUPTOOLS = (77, 0)  # pyproject.toml's SPDX `license` (PEP 639); bdist_wheel built in


def _check_setuptools():
    """Fail at once, saying what to do, where an old setuptools would fail later and obscurely:
    a --no-build-isolation build uses the environment's setuptools (Python 3.11's venv comes
    with 65.5, which cannot read pyproject.toml's license nor build a wheel without the wheel
    package, whose recent releases no longer provide bdist_wheel)."""
    try:
        version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
    except ValueError:
        return  # a development version: let it try
    if version < MIN_SETUPTOOLS:
        raise SystemExit(
            f"spinalkern needs setuptools>={MIN_SETUPTOOLS[0]} to build, this environment has "
            f"{setuptools.__version__}. Run `python -m pip install \"setuptools>=77\"` and "
            "repeat the command (with pip: pip install --no-build-isolation ...).")


_check_setuptools()

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
    # No -std flag: BuildExtension adds the standard the installed torch's headers need.
    cxx = ["-O3"]
    # python_module.cpp: the module spinalkern._C itself (the CMake build has no Python)
    sources = ["csrc/spinal_head.cpp", "csrc/head_autograd.cpp", "csrc/python_module.cpp"]
    if not _use_cuda():
        return [CppExtension("spinalkern._C", sources, extra_compile_args={"cxx": cxx})]
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    _log(f"building the CUDA extension (CUDA_HOME={_cuda_home}, torch {torch.__version__}, "
         f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}, "
         f"MAX_JOBS={os.environ['MAX_JOBS']})")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-Xptxas=--warn-on-spills"]
    if _flag("SPINALKERN_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    return [CUDAExtension(
        "spinalkern._C",
        sources + ["csrc/spinal_head_forward.cu", "csrc/spinal_head_backward.cu"],
        define_macros=[("SK_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )]


def _nvcc_version():
    nvcc = os.path.join(_cuda_home or "", "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([0-9.]+), V([0-9.]+)", out)
    return m.group(2) if m else None


def _ninja_flags(build_temp):
    """The compile flags BuildExtension actually used (its ninja file), e.g. the -std it added."""
    flags = {}
    try:
        with open(os.path.join(build_temp, "build.ninja")) as f:
            for line in f:
                name, sep, value = line.partition(" = ")
                if sep and name in ("cflags", "post_cflags", "cuda_cflags", "cuda_post_cflags"):
                    flags[name] = value.split()
    except OSError:
        pass
    return flags


class BuildWithInfo(BuildExtension):
    """BuildExtension that also writes spinalkern/_build_info.py beside the built extension."""

    def run(self):
        # setuptools clears self.inplace while it builds (then copies the result to the source
        # tree): remember whether the extension ends up in the source tree.
        self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extensions(self):
        super().build_extensions()
        flags = _ninja_flags(self.build_temp)
        ext = self.extensions[0]
        with_cuda = ("SK_WITH_CUDA", "1") in (ext.define_macros or [])
        std = sorted({f.split("=", 1)[1] for v in flags.values() for f in v
                      if f.startswith("-std=")})
        args = ext.extra_compile_args if isinstance(ext.extra_compile_args, dict) else {}
        info = {
            "version": _read_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "python": sys.version.split()[0],
            "with_cuda": with_cuda,
            "nvcc": _nvcc_version() if with_cuda else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
            "cxx_standard": std[0] if len(std) == 1 else (std or None),
            "cxx_flags": flags.get("post_cflags") or args.get("cxx"),
            "nvcc_flags": (flags.get("cuda_post_cflags") or args.get("nvcc")) if with_cuda else None,
            "ninja": bool(flags),
        }
        text = ("# Generated by setup.py when spinalkern._C was built; do not edit.\n"
                f"BUILD_INFO = {info!r}\n")
        targets = {os.path.dirname(self.get_ext_fullpath(ext.name))}
        if getattr(self, "_to_source", False):
            targets.add(os.path.join(ROOT, "spinalkern"))
        for d in targets:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "_build_info.py"), "w") as f:
                f.write(text)


def _read_version():
    with open(os.path.join(ROOT, "spinalkern", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=shutil.which("ninja") is not None)},
)
