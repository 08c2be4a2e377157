"""The CUDA extension's binaries: bench/check_cuda_build.py on synthetic SASS (so that each of
its checks is shown to fail when it should), on the committed report, and on the built
library (sm_80 + sm_90 code, async 16-byte staging and LDSM in every main loop, no scalar
16-bit global loads there, zero spills, no regression against the committed report)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import check_cuda_build as chk  # noqa: E402

TC = "void spinalkern::kern::head_forward_kernel<__nv_bfloat16, 64>(spinalkern::kern::ForwardParams<__nv_bfloat16>)"
SIMT = "void spinalkern::kern::head_backward_wgrad_kernel<float>(spinalkern::kern::BackwardParams<float>)"


def sass(*lines):
    return [(16 * i, t) for i, t in enumerate(lines)]


GOOD_TC = sass(
    "LDG.E.128 R4, desc[UR8][R4.64]",                      # prologue: may load anything
    "LDG.E.U16 R9, desc[UR8][R6.64]",
    "LDGSTS.E.BYPASS.128.ZFILL [R1], desc[UR4][R2.64], P0",  # 0x20: main loop start
    "BAR.SYNC.DEFER_BLOCKING 0x0",
    "LDSM.16.M88.4 R12, [R3]",
    "LDSM.16.MT88.4 R16, [R5]",
    "HMMA.16816.F32.BF16 R20, R12, R16, R20",
    "@P1 BRA 0x20",                                          # 0x70: back edge
    "STG.E.U16 desc[UR8][R6.64], R20",
    "EXIT",
)


def problems(kernel, instrs):
    return chk.analyse(kernel, instrs)["problems"]


def test_checker_accepts_a_pipelined_main_loop():
    info = chk.analyse(TC, GOOD_TC)
    assert info["problems"] == []
    assert info["main_loops"] == [{"range": "0x20-0x70", "instructions": 6, "async_copies": 1,
                                   "ldsm": 2, "math": 1, "ldg16": 0}]


def test_checker_flags_scalar_16_bit_loads_in_a_main_loop():
    bad = list(GOOD_TC)
    bad[3] = (0x30, "LDG.E.U16 R9, desc[UR8][R6.64]")
    assert any("scalar 16-bit global loads" in p for p in problems(TC, bad))


def test_checker_flags_fragments_not_loaded_with_ldsm():
    bad = [(a, "LDS.128 R12, [R3]" if t.startswith("LDSM") else t) for a, t in GOOD_TC]
    assert any("no LDSM" in p for p in problems(TC, bad))


def test_checker_flags_math_without_async_staging():
    no_async = [(a, "STS.128 [R1], R4" if t.startswith("LDGSTS") else t) for a, t in GOOD_TC]
    assert any("no main loop" in p for p in problems(TC, no_async))
    outside = GOOD_TC + [(0xa0, "HMMA.16816.F32.BF16 R20, R12, R16, R20")]
    assert any("outside the main loops" in p for p in problems(TC, outside))


def test_checker_flags_narrow_async_copies():
    bad = [(a, "LDGSTS.E.BYPASS.64 [R1], desc[UR4][R2.64]" if t.startswith("LDGSTS") else t)
           for a, t in GOOD_TC]
    assert any("narrower than 16 bytes" in p for p in problems(TC, bad))


def test_checker_simt_kernels_need_async_staging_but_no_ldsm():
    simt = [(a, t) for a, t in GOOD_TC if not t.startswith("LDSM")]
    simt = [(a, "FFMA R20, R12, R16, R20" if t.startswith("HMMA") else t) for a, t in simt]
    assert problems(SIMT, simt) == []
    no_async = [(a, t) for a, t in simt if not t.startswith("LDGSTS")]
    assert any("no main loop" in p for p in problems(SIMT, no_async))


def test_checker_only_asks_main_loops_of_the_gemm_kernels():
    reduce = "void spinalkern::kern::head_backward_reduce_kernel<float>(spinalkern::kern::BackwardParams<float>)"
    assert problems(reduce, sass("LDG.E.128 R4, desc[UR8][R4.64]", "@P0 BRA 0x0")) == []


def test_committed_report_passes_and_covers_both_architectures():
    with open(os.path.join(ROOT, "results", "kernels", "cuda_sass.json")) as f:
        kernels = json.load(f)["kernels"]
    assert {k["arch"] for k in kernels} == {"80", "90"}
    for k in kernels:
        assert k["ok"] and k["stack"] == 0 and k["local"] == 0, k["kernel"]
        if k["kernel"].startswith(("forward_kernel", "backward_chain", "backward_wgrad")):
            assert k["main_loops"], k["kernel"]
            for loop in k["main_loops"]:
                assert loop["async_copies"] > 0 and loop["ldg16"] == 0
                assert loop["ldsm"] > 0 or k["kind"] == "simt"


def _built_so():
    libs = glob.glob(os.path.join(ROOT, "spinalkern", "_C*.so"))
    return libs[0] if libs else None


def test_built_library_passes_the_checks():
    from spinalkern import cuda_backend
    if not cuda_backend.has_cuda_kernels():
        pytest.skip("spinalkern._C is not built with its CUDA kernels (no nvcc, or CPU-only build)")
    lib = _built_so()
    if lib is None:
        pytest.skip("spinalkern._C is loaded from outside the source tree")
    # setup.py builds sm_80 + sm_90 (+ PTX) unless TORCH_CUDA_ARCH_LIST says otherwise
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    cmd = [sys.executable, "-m", "bench.check_cuda_build", lib]
    for a in archs.replace(" ", ";").split(";"):
        if a:
            cmd += ["--arch", a.split("+")[0].replace(".", "")]
            if a.endswith("+PTX"):
                cmd += ["--ptx", a.split("+")[0].replace(".", "")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "zero spills" in r.stdout and "no regression" in r.stdout
