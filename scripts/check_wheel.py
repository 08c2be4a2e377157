"""The package as a user gets it: sdist -> wheel -> fresh environment -> use from outside.

    python scripts/check_wheel.py [--keep DIR]

1. builds the sdist (setuptools' PEP 517 hooks), unpacks it in a temporary folder and builds
   the wheel from it with `pip wheel --no-build-isolation` (so the sdist is complete, and the
   checkout's build/ folder is left alone); the extension is built CPU-only
   (SPINALKERN_SKIP_CUDA=1) to keep this cheap, unless SPINALKERN_SKIP_CUDA is set otherwise;
2. checks the wheel: its only top-level package is `spinalkern` (models/ and bench/ are not
   installed), it holds the compiled `_C`, `_build_info.py` and the LICENSE, and its metadata
   declares torch and the extras;
3. creates a fresh virtual environment that sees this environment's packages (torch,
   torchvision) through a .pth file, so nothing is downloaded, and installs the wheel with
   `pip install --no-deps --no-index`;
4. from a folder outside the checkout, with that environment's python: imports spinalkern
   (from the fresh environment), runs both heads on CPU with every backend available there
   against the float64 reference (forward and backward), runs replace_classifier on
   torchvision's ResNet-18, and runs `python -m spinalkern.info`.
Exit status 0 when everything holds.
"""
from __future__ import annotations

import argparse
import email.parser
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USE = r'''
import json, os, subprocess, sys
import torch, torchvision
import spinalkern
from spinalkern import ProgressiveHead, SpinalHead, reference_forward, replace_classifier

site = sys.argv[1]
assert os.path.realpath(spinalkern.__file__).startswith(os.path.realpath(site)), \
    f"spinalkern imported from {spinalkern.__file__}, not from the fresh environment {site}"
print(f"spinalkern {spinalkern.__version__} from {os.path.dirname(spinalkern.__file__)}")

backends = spinalkern.available_backends("cpu")
assert backends[:1] == ["torch"] and "cuda" in backends, \
    f"backends on cpu: {backends} (the wheel's compiled spinalkern._C must load)"
torch.manual_seed(0)
for make in (lambda b: SpinalHead(64, 10, 16, 3, 2, backend=b),
             lambda b: ProgressiveHead(64, 10, 16, 3, backend=b)):
    for backend in backends:
        head = make(backend)
        x = torch.randn(9, 64, requires_grad=True)
        y = head(x)
        y.square().sum().backward()
        ref = reference_forward(head.spec, x.detach().double(),
                                [w.detach().double() for w in head.weights()],
                                [b.detach().double() for b in head.biases()], 0.0)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5 and x.grad.isfinite().all(), (type(head).__name__, backend, err)
        print(f"{type(head).__name__:15s} backend={backend:5s} forward rel. error {err:.1e}, "
              "backward ok")

model = torchvision.models.resnet18()
replace_classifier(model, "spinal", num_classes=10, hidden_features=32)
assert isinstance(model.fc, SpinalHead)
out = model.eval()(torch.randn(2, 3, 32, 32))
assert out.shape == (2, 10), out.shape
print(f"replace_classifier: resnet18.fc -> {type(model.fc).__name__}, output {tuple(out.shape)}")

info = json.loads(subprocess.run([sys.executable, "-m", "spinalkern.info", "--json"],
                                 check=True, capture_output=True, text=True).stdout)
assert info["extension"]["loaded"] and info["build"]["torch"] == torch.__version__, info
subprocess.run([sys.executable, "-m", "spinalkern.info"], check=True)
'''


def run(cmd, **kw):
    print("+", " ".join(c if "\n" not in c else "<script>" for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build_wheel(work: str, env: dict) -> str:
    dist = os.path.join(work, "dist")
    hook = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    out = run([sys.executable, "-c", hook, dist], cwd=ROOT, env=env, capture_output=True,
              text=True).stdout.strip().splitlines()[-1]
    sdist = os.path.join(dist, out)
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        tf.extractall(os.path.join(work, "src"), filter="data")
    print(f"sdist {out}: {len(names)} files")
    src = os.path.join(work, "src", out[:-len(".tar.gz")])
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
         "-q", "-w", os.path.join(work, "wheel"), src], env=env)
    (wheel,) = glob.glob(os.path.join(work, "wheel", "spinalkern-*.whl"))
    return wheel


def check_wheel(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
    print(f"wheel {os.path.basename(wheel)}: top-level packages {top}")
    assert top == ["spinalkern"], f"the wheel must hold only spinalkern, it holds {top}"
    for required in ("spinalkern/_build_info.py", "spinalkern/info.py", "spinalkern/transfer.py"):
        assert required in names, f"{required} missing from the wheel"
    assert any(n.startswith("spinalkern/_C") and n.endswith(".so") for n in names), \
        "the compiled spinalkern._C is missing from the wheel"
    assert any(n.endswith("LICENSE") for n in names), "LICENSE missing from the wheel"
    requires = meta.get_all("Requires-Dist") or []
    extras = meta.get_all("Provides-Extra") or []
    print(f"  Requires-Dist: {requires}\n  Provides-Extra: {extras}")
    assert any(r.startswith("torch") and "extra" not in r for r in requires), requires
    assert {"train", "bench", "test"} <= set(extras), extras
    assert meta["License-Expression"] == "BSD-3-Clause", meta["License-Expression"]


def fresh_venv(work: str) -> tuple[str, str]:
    venv = os.path.join(work, "venv")
    run([sys.executable, "-m", "venv", venv])
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # this environment's packages (torch, torchvision, triton), after the fresh ones
    with open(os.path.join(site, "pinned_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", default=None, help="work in DIR and keep it (default: a temporary "
                   "folder, removed at the end)")
    args = p.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="spinalkern-wheel-")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "SPINALKERN_SKIP_CUDA": os.environ.get("SPINALKERN_SKIP_CUDA", "1")}
    try:
        t0 = time.perf_counter()
        wheel = build_wheel(work, env)
        t1 = time.perf_counter()
        check_wheel(wheel)
        python, site = fresh_venv(work)
        run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
        outside = os.path.join(work, "outside")
        os.makedirs(outside, exist_ok=True)
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
        run([python, "-c", USE, site], cwd=outside, env=clean)
        t2 = time.perf_counter()
        print(f"wheel check passed: build {t1 - t0:.0f} s, install and use {t2 - t1:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
