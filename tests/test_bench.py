"""Benchmarks of the head kernels (pytest-benchmark) and checks of the bench/ package.

    pytest -q tests/test_bench.py                        # CPU: tiny sizes; GPU: real sizes
    pytest -q tests/test_bench.py --benchmark-disable    # run each benchmark once, no timing

The smoke test runs ``python -m bench.heads --smoke`` as a subprocess into a temporary folder
and checks the JSON it writes, then feeds it to the plot and README-table scripts.  The
training-throughput and host-overhead scripts and the GPU runbook are exercised by
tests/test_runbook.py (the runbook's CPU rehearsal runs them).
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from bench import benchlib, heads, host_overhead, plots, readme_table
from spinalkern import _backends
from spinalkern.spec import HeadSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()


def _run(args, timeout=600):
    # conftest.py turns on Triton's CPU interpreter for the kernel tests; the smoke runs leave
    # it off, as CI runs them (the interpreter takes minutes for the wide heads).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m"] + args, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# --------------------------------------------------------------------------------------------
# Counting, errors, plan
# --------------------------------------------------------------------------------------------
def test_head_counts_by_hand():
    spec = HeadSpec("spinal", 4, 3, 2, 5, 2)   # seg 2: W0 (3,2), W1 (3,5), Wout (5,6)
    macs = 3 * 2 + 3 * 5 + 5 * 6
    params = macs + 3 + 3 + 5
    flops, nbytes = heads.head_counts(spec, 10, "fwd", 2)
    assert flops == 2 * 10 * macs
    assert nbytes == 2 * (10 * 4 + params + 10 * 5)
    flops, nbytes = heads.head_counts(spec, 10, "fwd+bwd", 4)
    assert flops == 3 * 2 * 10 * macs
    assert nbytes == 4 * 2 * (10 * 4 + params + 10 * 5)


def test_heads_are_specs_and_the_bn_head_is_the_papers():
    assert all(isinstance(h.spec, HeadSpec) for h in heads.HEADS)
    bn = heads.head_by_name("spinal_vgg5_bn_train")
    assert bn.spec == HeadSpec("spinal", 256, 128, 4, 62, 2)
    assert bn.batch_norm and bn.dropout == 0.5 and bn.training
    assert bn.passes == ("fwd+bwd",)
    assert bn.batches(heads.BATCHES) == [128, 256, 1024]
    assert bn.batches(heads.QUICK["batches"]) == [128, 1024]
    m = heads.bench_module(bn, "torch")
    assert m.training and m.norms is not None and m.dropout == 0.5
    m16 = heads.to_dtype(m, "cpu", torch.bfloat16)
    assert m16.out.weight.dtype == torch.bfloat16 and m16.norms[0].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown head"):
        heads.head_by_name("nope")


def test_errors_of_eager_and_of_a_wrong_result():
    head = heads.head_by_name("progressive_vgg5")
    cell = heads.Cell(head, 7, "fp32", "fwd+bwd", "cpu")
    assert len(cell.refs) == 2 + 2 * (head.spec.n + 1)
    # eager torch in fp32 is within the rule; the bounds are the project's floors or 2x torch
    assert cell.check(heads.make_step(*_module_and_params(cell, "torch"), "fwd+bwd")(
        cell.xs[0], cell.dys[0]))["correct"]
    assert all(b >= 2e-5 for b in cell.bounds)
    outs = heads.make_step(*_module_and_params(cell, "torch"), "fwd+bwd")(cell.xs[0], cell.dys[0])
    bad = (outs[0] + 1.0,) + tuple(outs[1:])
    assert not cell.check(bad)["correct"]
    nan = (outs[0],) + (outs[1] * float("nan"),) + tuple(outs[2:])
    assert math.isinf(heads.max_rel_err(nan, cell.refs)) and not cell.check(nan)["correct"]


def test_zero_reference_gradient_is_measured_against_the_largest_norm():
    """The exact gradient of a bias right before training-mode BatchNorm is zero: its error is
    measured against the largest reference norm, not relative to ~0."""
    refs = (torch.ones(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    outs = (torch.ones(4), torch.full((3,), 1e-7))
    errs = heads.errors(outs, refs)
    assert errs[0] == 0.0 and 0 < errs[1] < 1e-6
    outs = (torch.ones(4), torch.full((3,), 0.5))
    assert heads.errors(outs, refs)[1] > 0.1


def test_bn_head_checked_with_dropout_off_and_path_recorded():
    head = heads.head_by_name("spinal_vgg5_bn_train")
    cell = heads.Cell(head, 16, "fp32", "fwd+bwd", "cpu")
    opts = heads.parse_args(["--smoke", "--device", "cpu"])
    row = heads.run_variant(cell, "torch", opts, {})
    assert "error" not in row, row
    assert row["correct"] and row["path"] == "eager" and "dropout off" in row["checked"]
    assert row["training"] and row["batch_norm"] and row["median_ms"] > 0


def _module_and_params(cell, backend):
    m = cell.module(backend, dropout=0.0)
    return m, list(m.parameters())


def test_plan_runs_goal_cells_first_then_their_compiles():
    opts = heads.parse_args(["--quick", "--device", "cpu"])
    tasks = heads.plan(heads.HEADS, opts, ["torch", "torch+compile", "cuda"])
    kinds = [t[0] for t in tasks]
    goal = [t for t in tasks if heads.is_goal_cell(*t[1])]
    n_goal_cells = sum(1 for t in goal if t[0] == "cell")
    # 6 heads x (fwd+bwd at 128 and 1024, fwd at 65536) + the BN head's 2 training cells
    assert n_goal_cells == 6 * 3 + 2
    assert kinds[:n_goal_cells] == ["cell"] * n_goal_cells
    assert all(t[2] == ["torch", "cuda"] for t in tasks if t[0] == "cell")
    compiles = [t for t in tasks[n_goal_cells:] if t[0] == "compile"]
    first_rest = next(i for i, t in enumerate(tasks) if not heads.is_goal_cell(*t[1]))
    assert all(heads.is_goal_cell(*t[1]) for t in tasks[:first_rest])
    assert len([t for t in tasks[:first_rest] if t[0] == "compile"]) == n_goal_cells
    assert compiles[0][1][3] == "fwd+bwd"          # training-batch compiles before B=65536


# --------------------------------------------------------------------------------------------
# Helpers: optional imports, the commit of a tree without .git
# --------------------------------------------------------------------------------------------
def test_optional_import_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert benchlib.optional_import("no_such_module_spinalkern", "nothing is lost") is None
        assert benchlib.optional_import("no_such_module_spinalkern", "nothing is lost") is None
    assert len(caught) == 1 and "nothing is lost" in str(caught[0].message)
    assert benchlib.optional_import("json", "-") is json


def test_commit_read_from_file_when_git_cannot_answer(tmp_path, monkeypatch):
    from models.training import provenance
    path = tmp_path / "COMMIT"
    path.write_text("commit=0123456789abcdef\ndirty=yes\ndate=2026-01-01T00:00:00+00:00\n")
    monkeypatch.setattr(benchlib, "REPO_ROOT", str(tmp_path))          # no .git here
    monkeypatch.setenv(provenance.COMMIT_FILE_ENV, str(path))
    assert benchlib.commit_info() == {"commit": "0123456789abcdef", "dirty": True,
                                      "source": str(path)}
    assert benchlib.git_commit() == "0123456789abcdef-dirty"
    monkeypatch.setenv(provenance.COMMIT_FILE_ENV, str(tmp_path / "missing"))
    assert benchlib.git_commit() == "unknown"
    assert benchlib.commit_info()["commit"] == "unknown"


def test_commit_file_written_from_git(tmp_path, monkeypatch):
    from bench import commit
    from models.training import provenance
    info = provenance.git_info()
    if info["source"] != "git":
        pytest.skip("this checkout has no .git (the file is written where git works)")
    path = str(tmp_path / "COMMIT")
    commit.write(path)
    read = provenance.read_commit_file(path)
    assert (read["commit"], read["dirty"]) == (info["commit"], info["dirty"])


# --------------------------------------------------------------------------------------------
# Host-overhead goals (the benchmark itself runs in the runbook rehearsal)
# --------------------------------------------------------------------------------------------
def _host_rows(ratio):
    rows = []
    for h in host_overhead.TINY:
        rows.append({"head": h, "backend": "torch", "pass": "fwd+bwd", "median_us": 100.0,
                     "ratio_vs_torch": 1.0})
        rows.append({"head": h, "backend": "cuda", "pass": "fwd+bwd",
                     "median_us": 100.0 * ratio, "ratio_vs_torch": ratio})
    return rows


def test_host_goal_met_and_missed():
    cpu = torch.device("cpu")
    met = host_overhead.evaluate_goals(_host_rows(0.3), cpu, ["cuda"])
    assert len(met) == 1 and met[0]["met"] and met[0]["status"].startswith("met")
    missed = host_overhead.evaluate_goals(_host_rows(1.02), cpu, ["cuda"])
    assert not missed[0]["met"] and missed[0]["status"].startswith("MISSED: 1.02")
    none = host_overhead.evaluate_goals([], cpu, [])
    assert none[0]["status"] == "not measured" and not none[0]["met"]


# --------------------------------------------------------------------------------------------
# pytest-benchmark suite: every available backend, both heads, fwd and fwd+bwd
# --------------------------------------------------------------------------------------------
DEVICE = "cuda" if GPU else "cpu"
BENCH_BATCH = 1024 if GPU else 64
BENCH_DTYPE = "bf16" if GPU else "fp32"


def _timed_backends():
    import spinalkern
    out = spinalkern.available_backends(DEVICE)
    if not GPU:  # Triton's CPU interpreter is for correctness, not worth timing
        out = [b for b in out if b != "triton"]
    return out


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("config", ["spinal_vgg5", "progressive_vgg5"])
@pytest.mark.parametrize("backend", _timed_backends())
def test_head_benchmark(benchmark, backend, config, pass_):
    cell = heads.Cell(heads.head_by_name(config), BENCH_BATCH, BENCH_DTYPE, pass_, DEVICE)
    m = cell.module(backend)
    step = heads.make_step(m, list(m.parameters()), pass_)

    def call():
        out = step(cell.xs[0], cell.dys[0])
        if GPU:
            torch.cuda.synchronize()
        return out

    outs = benchmark.pedantic(call, rounds=20 if GPU else 5, iterations=1, warmup_rounds=2)
    check = cell.check(outs)
    benchmark.extra_info.update(batch=BENCH_BATCH, dtype=BENCH_DTYPE, **check)
    assert check["correct"], check


# --------------------------------------------------------------------------------------------
# Smoke run of the kernel benchmark
# --------------------------------------------------------------------------------------------
REQUIRED_ROW = {"head": str, "backend": str, "pass": str, "batch": int, "dtype": str,
                "median_ms": float, "max_rel_err": float, "roofline_fraction": float,
                "roofline_floor_ms": float, "flops": int, "min_bytes": int, "rotate": int,
                "path": str, "error_vs_bound": float}
REQUIRED_ENV = ("device_name", "driver", "torch", "triton", "cuda_runtime", "git_commit",
                "git_commit_source", "date")
SMOKE_HEADS = ["spinal_vgg5", "spinal_vgg5_bn_train", "progressive_vgg5"]


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    _run(["bench.heads", "--smoke", "--out", str(out), "--no-progress",
          "--heads", *SMOKE_HEADS])
    files = glob.glob(str(out / "heads-*.json"))
    assert len(files) == 1, files
    return files[0]


def test_heads_smoke_schema(smoke_json):
    with open(smoke_json) as f:
        data = json.load(f)
    assert data["kind"] == "heads" and data["mode"] == "smoke" and data["complete"]
    assert data["tasks_done"] == data["tasks"]
    for key in REQUIRED_ENV:
        assert key in data["environment"], key
    assert data["environment"]["git_commit"] != "unknown"
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
        assert r["path"] == {"torch": "eager", "torch+compile": "inductor"}.get(
            r["backend"], r["path"])
        base = r["base_backend"]
        if base in ("triton", "cuda") and (r["head"] != "spinal_vgg5_bn_train"
                                           or _backends.get(base).bn_forward_op is not None):
            assert r["path"] == "fused", r   # no fallback where a fused op exists
    # every head, each of its passes, every smoke dtype has an eager row
    eager = {(r["head"], r["pass"], r["dtype"]) for r in rows if r["backend"] == "torch"}
    expected = {(h.name, p, d) for h in map(heads.head_by_name, SMOKE_HEADS)
                for p in h.passes for d in heads.SMOKE["dtypes"]}
    assert eager == expected
    bn = [r for r in rows if r["head"] == "spinal_vgg5_bn_train"]
    assert bn and all(r["pass"] == "fwd+bwd" and r["training"] for r in bn)
    assert all(r["path"] in ("eager", "fused") for r in bn)
    assert any(r["backend"] == "torch+compile" and r["compile_s"] > 0 for r in rows)
    # backends that could not run are named with a reason
    names = {r["backend"] for r in rows} | {s["backend"] for s in data["skipped"]}
    assert set(heads.VARIANTS) <= names


def test_plots_and_table_from_smoke(smoke_json, tmp_path):
    written = plots.main([smoke_json, "--out", str(tmp_path)])
    assert written and all(os.path.getsize(p) > 1000 for p in written)
    text = readme_table.main(["--heads", smoke_json, "--results-dir", str(tmp_path)])
    assert "| head | pass | B |" in text and "Goals" in text and "Smoke run" in text
    assert "BatchNorm head in training" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold\n{readme_table.END}\nrest\n")
    readme_table.main(["--heads", smoke_json, "--results-dir", str(tmp_path),
                       "--readme", str(readme)])
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("rest\n") and "old" not in new
    assert "| head | pass | B |" in new


def test_readme_table_without_results(tmp_path):
    assert "No kernel benchmark results yet" in readme_table.main(["--results-dir",
                                                                   str(tmp_path)])


def test_readme_table_counts_an_eager_fallback_as_a_miss():
    row = {"head": "spinal_vgg5_bn_train", "pass": "fwd+bwd", "batch": 128, "dtype": "bf16",
           "correct": True}
    cells = {("spinal_vgg5_bn_train", "fwd+bwd", 128, "bf16"): {
        "torch": dict(row, backend="torch", base_backend="torch", median_ms=3.0, path="eager"),
        "cuda": dict(row, backend="cuda", base_backend="cuda", median_ms=1.0, path="eager")}}
    text = readme_table.speed_goal(cells, "cuda", "torch", 3.0,
                                   heads=[readme_table.BN_HEAD])
    assert text.startswith("MISSED") and "eager fallback" in text
    cells[("spinal_vgg5_bn_train", "fwd+bwd", 128, "bf16")]["cuda"]["path"] = "fused"
    assert readme_table.speed_goal(cells, "cuda", "torch", 3.0,
                                   heads=[readme_table.BN_HEAD]).startswith("met: 3.00x")
    # the goals of issue 5 leave the BatchNorm training head to its own goal
    assert readme_table.speed_goal(cells, "cuda", "torch", 3.0) == "not measured"
