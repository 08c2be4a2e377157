"""Packaging facts that must stay true (the wheel itself is built and used by
scripts/check_wheel.py, a step of scripts/test.sh)."""
from __future__ import annotations

import ast
import glob
import json
import os
import re
import subprocess
import sys
import tomllib

import torch

import spinalkern
from spinalkern import cuda_backend, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)

# import name -> distribution name, for the third-party modules the repository uses
DISTRIBUTIONS = {"torch": "torch", "triton": "triton", "torchvision": "torchvision",
                 "numpy": "numpy", "tqdm": "tqdm", "matplotlib": "matplotlib",
                 "pynvml": "nvidia-ml-py", "pytest": "pytest", "hypothesis": "hypothesis"}


def _third_party_imports(folder: str) -> set[str]:
    """Top-level names imported by the Python files in ``folder`` and its subfolders that are
    neither the standard library nor the repository's own modules."""
    files = glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    local = {os.path.splitext(os.path.basename(p))[0] for p in files}
    local |= {"spinalkern", "models", "bench", "conftest"}
    found = set()
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.add(top)
    return found


def _names(requirements) -> set[str]:
    return {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_only_spinalkern_is_installed():
    assert PYPROJECT["tool"]["setuptools"]["packages"] == ["spinalkern"]


def test_every_import_is_declared():
    project = PYPROJECT["project"]
    runtime = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    for folder, declared in (("spinalkern", runtime),
                             ("models", runtime | extras["train"]),
                             ("bench", runtime | extras["bench"]),
                             ("tests", runtime | extras["test"])):
        for module in sorted(_third_party_imports(folder)):
            assert module in DISTRIBUTIONS, f"{folder}/ imports {module}: add it to DISTRIBUTIONS"
            assert DISTRIBUTIONS[module] in declared, \
                f"{folder}/ imports {module}, which pyproject.toml does not declare for that use"


def test_the_version_is_written_once():
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "spinalkern.__version__"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = tracked.stdout.split() if tracked.returncode == 0 else []
    writes = []
    for path in files:
        if path.endswith((".py", ".toml", ".cff", ".cfg")):
            with open(os.path.join(ROOT, path), errors="replace") as f:
                if re.search(r"^(__version__|version)\s*[:=]\s*[\"']?\d", f.read(), re.M):
                    writes.append(path)
    assert writes in ([], ["spinalkern/__init__.py"]), writes
    assert re.fullmatch(r"\d+\.\d+\.\d+", spinalkern.__version__)


def test_build_requirements_and_cxx_standard():
    requires = PYPROJECT["build-system"]["requires"]
    assert "torch" in requires and any(r.startswith("setuptools>=77") for r in requires)
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    (extensions,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                     and n.name == "extensions"]
    flags = [n.value for n in ast.walk(extensions) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and n.value.startswith("-")]
    assert "-O3" in flags  # (the walk sees the flags)
    assert not [f for f in flags if f.startswith(("-std", "--std"))], \
        "the C++ standard is torch's choice (BuildExtension adds what its headers need)"


def test_old_setuptools_fails_at_once_saying_what_to_do(tmp_path):
    fake = tmp_path / "setuptools"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "65.5.0"\ndef setup(**kw):\n    pass\n')
    r = subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "bdist_wheel"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert 'needs setuptools>=77' in r.stderr and 'pip install "setuptools>=77"' in r.stderr


def test_info_reports_backends_and_build(capsys):
    d = info.info()
    assert d["spinalkern"] == spinalkern.__version__ and d["torch"] == torch.__version__
    cpu = d["backends"]["cpu"]
    assert "torch" in cpu["available"]
    assert set(cpu["available"]) | set(cpu["unavailable"]) == {"torch", "triton", "cuda"}
    assert all(reason for reason in cpu["unavailable"].values())
    assert ("cuda" in cpu["available"]) == cuda_backend.available()
    if cuda_backend.available():  # built by setup.py here: it recorded how
        built = d["build"]
        assert built is not None and built["torch"] == torch.__version__
        assert built["with_cuda"] == cuda_backend.has_cuda_kernels()
        assert built["cxx_standard"] and built["cxx_flags"]
    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert f"spinalkern {spinalkern.__version__}" in text and "backends on cpu:" in text
    assert info.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"]["cpu"]["available"][0] == "torch"


def test_license_and_citation():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert f.readline().strip() == "BSD 3-Clause License"
    assert PYPROJECT["project"]["license"] == "BSD-3-Clause"
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        cff = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for needle in ("2007.03347", "2103.11373"):
        assert needle in cff and needle in readme
