"""The GPU runbook rehearsed on CPU, the way the GPU machine runs it.

The GPU machine has ``python3`` only (no ``python``), no network, and returns at most 8 files,
at most 2 folders deep, 16 MiB each, from the output folder.  So the rehearsal runs
``bench/gpu_runbook.sh`` under ``env -i`` with a PATH whose only Python interpreter is a
``python3`` link, with a short budget, and checks what would come back.  The same run's
results files check the training-throughput and host-overhead benchmarks (their CPU smoke
runs are steps of the rehearsal).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 240               # generous for a loaded 2-core CI machine; ~1 minute when idle
COMPILE_TIMEOUT_S = 3        # the compile cell must hit its hard timeout (and be recorded)
EXPECTED_FILES = {"summary.md", "steps.tsv", "heads.json", "train.json", "host.json",
                  "runbook.tgz"}
EXPECTED_STEPS = ["facts", "tests-triton", "build", "tests-cuda", "heads", "host", "train",
                  "sanitize", "tune", "plots"]


def python3_link(folder) -> str:
    """A folder holding one interpreter, ``python3``: a link to this test's Python.

    In a virtual environment the link is a small environment of its own (``pyvenv.cfg`` plus
    a link to the venv's ``lib``), so that the linked interpreter finds the same packages.
    """
    bin_dir = os.path.join(folder, "bin")
    os.makedirs(bin_dir)
    real = os.path.realpath(sys.executable)
    os.symlink(real, os.path.join(bin_dir, "python3"))
    if sys.prefix != sys.base_prefix:
        shutil.copy(os.path.join(sys.prefix, "pyvenv.cfg"), os.path.join(folder, "pyvenv.cfg"))
        os.symlink(os.path.join(sys.prefix, "lib"), os.path.join(folder, "lib"))
    return bin_dir


def tool_links(folder) -> str:
    """Links to every program in /usr/bin and /bin except Python interpreters."""
    os.makedirs(folder)
    for src in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(src):
            continue
        for name in os.listdir(src):
            path = os.path.join(src, name)
            dst = os.path.join(folder, name)
            if name.startswith("python") or os.path.lexists(dst) or not os.access(path, os.X_OK):
                continue
            os.symlink(path, dst)
    return folder


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolbox")
    bin_dir = python3_link(str(root / "py"))
    tools = tool_links(str(root / "tools"))
    return bin_dir, tools


def bare_env(path: str, **extra) -> list[str]:
    env = ["env", "-i", f"PATH={path}", f"HOME={os.environ.get('HOME', '/tmp')}"]
    return env + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def rehearsal(toolbox, tmp_path_factory):
    bin_dir, tools = toolbox
    out = tmp_path_factory.mktemp("runbook") / "out"
    cmd = bare_env(f"{bin_dir}:{tools}", RUNBOOK_BUDGET_S=BUDGET_S,
                   RUNBOOK_COMPILE_TIMEOUT_S=COMPILE_TIMEOUT_S, RUNBOOK_TUNE_S=60) + [
        "bash", os.path.join(REPO, "bench", "gpu_runbook.sh"), str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=BUDGET_S + 120)
    wall = time.monotonic() - t0
    return proc, wall, out


def test_bare_environment_has_python3_only(toolbox):
    bin_dir, tools = toolbox
    path = f"{bin_dir}:{tools}"
    run = subprocess.run(bare_env(path) + ["bash", "-c", "command -v python3; command -v python;"
                                                         " python3 -c 'import torch'"],
                         capture_output=True, text=True, timeout=120)
    lines = run.stdout.split()
    assert lines == [os.path.join(bin_dir, "python3")], run.stdout + run.stderr
    assert run.returncode == 0, run.stderr   # python3 imports torch; `python` does not exist


def test_runbook_rehearsal_on_cpu(rehearsal):
    proc, wall, out = rehearsal
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    assert wall < BUDGET_S + 60, f"{wall:.0f} s: {log}"
    # what comes back from the GPU machine: at most 8 files, <= 2 folders deep, < 16 MiB each
    files = []
    for folder, _, names in os.walk(out):
        depth = os.path.relpath(folder, out).count(os.sep) + (folder != str(out))
        assert depth <= 2, folder
        files += [os.path.join(folder, n) for n in names]
    assert len(files) <= 8, files
    assert all(os.path.getsize(f) < 16 << 20 for f in files)
    # this runbook promises fewer: six files, no folder
    assert set(os.listdir(out)) == EXPECTED_FILES, os.listdir(out)
    assert (out / "summary.md").read_text().startswith("# GPU runbook summary")


def test_every_step_ok_or_skipped_for_want_of_a_gpu(rehearsal):
    proc, _, out = rehearsal
    with open(out / "steps.tsv") as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    assert [s["step"] for s in steps] == EXPECTED_STEPS, proc.stdout[-3000:]
    for s in steps:
        assert s["result"] == "ok" or (s["result"] == "skipped (no GPU)" and s["detail"]), s
        assert "exit 127" not in s["result"] and "exit 126" not in s["result"], s
    summary = (out / "summary.md").read_text()
    assert all(f"| {s['step']} | {s['result']} |" in summary for s in steps)
    # no step died for a missing command (e.g. `python`): look through every log
    with tarfile.open(out / "runbook.tgz") as tgz:
        names = tgz.getnames()
        assert "./machine.json" in names and "./logs/heads.log" in names, names
        for member in tgz.getmembers():
            if member.isfile() and member.name.endswith(".log"):
                text = tgz.extractfile(member).read().decode(errors="replace")
                assert "command not found" not in text, (member.name, text[-2000:])
                assert "No such file or directory: 'python'" not in text, member.name


def test_rehearsal_heads_results(rehearsal):
    _, _, out = rehearsal
    data = json.loads((out / "heads.json").read_text())
    assert data["kind"] == "heads" and data["complete"]
    assert data["environment"]["git_commit"] not in ("", "unknown")
    rows = data["rows"]
    timed = [r for r in rows if r.get("median_ms")]
    assert {r["head"] for r in timed} == {"spinal_vgg5", "spinal_vgg5_bn_train"}
    assert all(r["correct"] for r in timed)
    bn = [r for r in timed if r["head"] == "spinal_vgg5_bn_train"]
    assert bn and all(r["path"] in ("eager", "fused") for r in bn)
    compiled = [r for r in rows if r["backend"] == "torch+compile"]
    assert len(compiled) == 1 and compiled[0]["compile_timed_out"]
    assert compiled[0]["error"] == f"compile timed out after {COMPILE_TIMEOUT_S} s"
    assert "torch.compile timed out" in (out / "summary.md").read_text()


def test_rehearsal_host_overhead_results(rehearsal):
    _, _, out = rehearsal
    from spinalkern import cuda_backend
    data = json.loads((out / "host.json").read_text())
    env = data["environment"]
    assert data["kind"] == "host" and env["device_type"] == "cpu" and env["torch"]
    assert env["git_commit"] not in ("", "unknown")
    backends = {r["backend"] for r in data["rows"]}
    assert "torch" in backends
    assert ("cuda" in backends) == cuda_backend.available()
    for r in data["rows"]:
        assert r["batch"] == 8 and r["dtype"] == "fp32"
        if r["pass"] != "bwd":
            assert r["median_us"] > 0 and r["rounds"] == 11 and r["calls_timed"] == 11 * 10
        assert r["ratio_vs_torch"] is not None
    assert {r["pass"] for r in data["rows"]} == {"fwd", "fwd(grad)", "fwd+bwd", "bwd"}
    assert all(g["status"].startswith(("met", "MISSED", "not measured")) for g in data["goals"])
    if cuda_backend.available():
        assert data["goals"][0]["backend"] == "cuda" and "value" in data["goals"][0]


def test_rehearsal_training_throughput_results(rehearsal):
    _, _, out = rehearsal
    data = json.loads((out / "train.json").read_text())
    assert data["kind"] == "train" and data["rows"] and data["complete"]
    for r in data["rows"]:
        assert r.get("images_per_s", 0) > 0, r
        assert r["params"] > 0
    assert any(r["paper_loop"] for r in data["rows"])
    assert any(not r["paper_loop"] for r in data["rows"])


def test_runbook_stops_at_once_without_torch(toolbox, tmp_path):
    """An interpreter that cannot import torch: a clear message, exit 2, no results."""
    _, tools = toolbox
    no_torch = tmp_path / "bin"
    no_torch.mkdir()
    fake = no_torch / "python3"   # the real interpreter without site-packages
    fake.write_text(f"#!/bin/sh\nexec {os.path.realpath(sys.executable)} -S \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(bare_env(f"{no_torch}:{tools}") + [
        "bash", os.path.join(REPO, "bench", "gpu_runbook.sh"), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot import torch" in proc.stderr
    assert time.monotonic() - t0 < 20
    assert not out.exists() or not os.listdir(out)
    san = subprocess.run(bare_env(f"{no_torch}:{tools}") + [
        "bash", os.path.join(REPO, "bench", "sanitize.sh")],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert san.returncode == 2 and "cannot import torch" in san.stdout


def test_gpu_marker_selects_the_gpu_only_tests():
    """`pytest -m gpu` (what the runbook runs) selects the GPU-only kernel tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", "-m", "gpu", "tests/test_heads.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids and all("::test_gpu_" in i for i in ids), ids[:5]


def test_collect_brings_results_into_the_results_folder(rehearsal, tmp_path):
    from bench import collect, readme_table
    _, _, out = rehearsal
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="smoke runs"):
        collect.main([str(out), "--results-dir", str(results), "--no-readme"])
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{readme_table.START}\nold\n{readme_table.END}\ny\n")
    written = collect.main([str(out), "--results-dir", str(results), "--readme", str(readme),
                            "--allow-smoke"])
    names = sorted(os.path.basename(w).split("-")[0] for w in written)
    assert names == ["heads", "host", "runbook", "train"], written
    text = readme.read_text()
    assert "old" not in text and "Host overhead" in text and "| head | pass | B |" in text
