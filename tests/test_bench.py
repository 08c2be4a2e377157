"""Benchmarks of the head kernels (pytest-benchmark) and smoke tests of the bench/ scripts.

    pytest -q tests/test_bench.py                        # CPU: tiny sizes; GPU: real sizes
    pytest -q tests/test_bench.py --benchmark-disable    # run each benchmark once, no timing

The smoke tests run ``bench/heads.py --smoke`` (and the training-throughput smoke) as
subprocesses into a temporary folder and check the JSON they write, then feed it to the
plot and README-table scripts.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
GPU = torch.cuda.is_available()


def _load(name):
    """Import bench/<name>.py under a unique module name (no clash with other tests)."""
    spec = importlib.util.spec_from_file_location(f"spinalkern_bench_{name}",
                                                  os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


heads = _load("heads")


def _run(args, timeout=600):
    # conftest.py turns on Triton's CPU interpreter for the kernel tests; the smoke runs leave
    # it off, as CI runs them (the interpreter takes minutes for the wide heads).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------
def test_head_counts_by_hand():
    from spinalkern.spec import HeadSpec
    spec = HeadSpec("spinal", 4, 3, 2, 5, 2)   # seg 2: W0 (3,2), W1 (3,5), Wout (5,6)
    macs = 3 * 2 + 3 * 5 + 5 * 6
    params = macs + 3 + 3 + 5
    flops, nbytes = heads.head_counts(spec, 10, "fwd", 2)
    assert flops == 2 * 10 * macs
    assert nbytes == 2 * (10 * 4 + params + 10 * 5)
    flops, nbytes = heads.head_counts(spec, 10, "fwd+bwd", 4)
    assert flops == 3 * 2 * 10 * macs
    assert nbytes == 4 * 2 * (10 * 4 + params + 10 * 5)


def test_rel_err_of_eager_is_small():
    cfg = heads.CONFIGS[3]
    torch.manual_seed(0)
    m = heads.make_head(cfg, "torch").double()
    x = torch.randn(7, cfg.D, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, cfg.C, dtype=torch.float64)
    refs = heads.reference_outputs(m, x, dy, "fwd+bwd")
    outs = heads.make_step(m, m.weights() + m.biases(), "fwd+bwd")(x, dy)
    assert len(outs) == len(refs) == 2 + 2 * (cfg.n + 1)
    assert heads.max_rel_err(outs, refs) < 1e-12
    bad = (outs[0] + 1.0,) + tuple(outs[1:])
    assert heads.max_rel_err(bad, refs) > 1e-3


# --------------------------------------------------------------------------------------------
# pytest-benchmark suite: every available backend, both heads, fwd and fwd+bwd
# --------------------------------------------------------------------------------------------
DEVICE = "cuda" if GPU else "cpu"
BENCH_BATCH = 1024 if GPU else 64
BENCH_DTYPE = torch.bfloat16 if GPU else torch.float32


def _backends():
    import spinalkern
    out = spinalkern.available_backends(DEVICE)
    if not GPU:  # Triton's CPU interpreter is for correctness, not worth timing
        out = [b for b in out if b != "triton"]
    return out


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("config", ["spinal_vgg5", "progressive_vgg5"])
@pytest.mark.parametrize("backend", _backends())
def test_head_benchmark(benchmark, backend, config, pass_):
    cfg = next(c for c in heads.CONFIGS if c.name == config)
    batch = BENCH_BATCH
    torch.manual_seed(0)
    m = heads.make_head(cfg, backend).to(DEVICE, BENCH_DTYPE)
    bwd = pass_ == "fwd+bwd"
    x = torch.randn(batch, cfg.D, device=DEVICE, dtype=BENCH_DTYPE, requires_grad=bwd)
    dy = torch.randn(batch, cfg.C, device=DEVICE, dtype=BENCH_DTYPE)
    step = heads.make_step(m, m.weights() + m.biases(), pass_)

    def call():
        out = step(x, dy)
        if GPU:
            torch.cuda.synchronize()
        return out

    outs = benchmark.pedantic(call, rounds=20 if GPU else 5, iterations=1, warmup_rounds=2)
    refs = heads.reference_outputs(m, x, dy, pass_)
    err, err_out = heads.max_rel_err(outs, refs), heads.max_rel_err(outs[:1], refs[:1])
    benchmark.extra_info.update(batch=batch, dtype=str(BENCH_DTYPE), max_rel_err=err)
    assert heads.is_correct("bf16" if BENCH_DTYPE == torch.bfloat16 else "fp32", err_out, err)


# --------------------------------------------------------------------------------------------
# Smoke runs of the scripts
# --------------------------------------------------------------------------------------------
REQUIRED_ROW = {"head": str, "backend": str, "pass": str, "batch": int, "dtype": str,
                "median_ms": float, "max_rel_err": float, "roofline_fraction": float,
                "roofline_floor_ms": float, "flops": int, "min_bytes": int, "rotate": int}
REQUIRED_ENV = ("device_name", "driver", "torch", "triton", "cuda_runtime", "git_commit", "date")


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    _run([os.path.join("bench", "heads.py"), "--smoke", "--out", str(out), "--no-progress"])
    files = glob.glob(str(out / "*.json"))
    assert len(files) == 1, files
    return files[0]


def test_heads_smoke_schema(smoke_json):
    with open(smoke_json) as f:
        data = json.load(f)
    assert data["kind"] == "heads" and data["mode"] == "smoke"
    for key in REQUIRED_ENV:
        assert key in data["environment"], key
    assert data["peaks"]["copy_bytes_per_s"] > 0
    assert all(v > 0 for v in data["peaks"]["matmul_flops_per_s"].values())
    rows = data["rows"]
    assert rows and not data["cell_errors"]
    for r in rows:
        assert "error" not in r, r
        for key, typ in REQUIRED_ROW.items():
            assert isinstance(r[key], typ), (key, r)
        assert r["pass"] in ("fwd", "fwd+bwd")
        assert r["dtype"] in heads.DTYPES
        assert r["median_ms"] > 0 and math.isfinite(r["max_rel_err"])
        assert r["correct"], f"wrong result: {r}"
        if r["pass"] == "fwd+bwd" and r["backend"] == "torch":
            assert r["saved_bytes"] > 0
        if GPU and r["backend"] in ("torch", "triton", "cuda"):
            assert r["peak_mem_bytes"] > 0
    # every config, both passes, every smoke dtype has an eager row
    eager = {(r["head"], r["pass"], r["dtype"]) for r in rows if r["backend"] == "torch"}
    assert len(eager) == len(heads.CONFIGS) * 2 * len(heads.SMOKE["dtypes"])
    assert any(r["backend"] == "torch+compile" for r in rows)
    # backends that could not run are named with a reason
    names = {r["backend"] for r in rows} | {s["backend"] for s in data["skipped"]}
    assert set(heads.VARIANTS) <= names


def test_plots_and_table_from_smoke(smoke_json, tmp_path):
    plots = _load("plots")
    written = plots.main([smoke_json, "--out", str(tmp_path)])
    assert written and all(os.path.getsize(p) > 1000 for p in written)
    table = _load("readme_table")
    text = table.main(["--heads", smoke_json, "--results-dir", str(tmp_path)])
    assert "| head | pass | B |" in text and "Goals" in text and "Smoke run" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.START}\nold\n{table.END}\nrest\n")
    table.main(["--heads", smoke_json, "--results-dir", str(tmp_path), "--readme", str(readme)])
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("rest\n") and "old" not in new
    assert "| head | pass | B |" in new


def test_readme_table_without_results(tmp_path):
    table = _load("readme_table")
    assert "No kernel benchmark results yet" in table.main(["--results-dir", str(tmp_path)])


def test_train_throughput_smoke(tmp_path):
    pytest.importorskip("models.train", reason="models/ (training CLI) not importable yet")
    _run([os.path.join("bench", "train_throughput.py"), "--smoke", "--out", str(tmp_path)])
    files = glob.glob(str(tmp_path / "train-*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        data = json.load(f)
    assert data["kind"] == "train" and data["rows"]
    for r in data["rows"]:
        assert r.get("images_per_s", 0) > 0, r
        assert r["params"] > 0
    assert any(r["paper_loop"] for r in data["rows"])
    assert any(not r["paper_loop"] for r in data["rows"])
    table = _load("readme_table").render(None, None, files[0], data)
    assert "No kernel benchmark results yet" in table
