"""DistributedDataParallel through torchrun: 2 CPU processes on the gloo backend."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SPINALKERN_DATA", os.path.join(REPO, "..", "shared", "data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "models.train", "--device", "cpu", "--data-root", SHARED, "--out", str(out),
           "--progress", "off", "--no-plot", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "address already in use" in (r.stdout + r.stderr).lower():
        return _torchrun(out, *args, nproc=nproc)   # the free port was taken meanwhile
    return r


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "mnist")),
                    reason="shared MNIST not found")
def test_ddp_two_cpu_processes_gloo(tmp_path):
    common = ["--model", "spinal-cnn-8", "--backend", "torch", "--data", "mnist",
              "--batch-size", "64", "--train-subset", "3200", "--test-subset", "1000",
              "--no-augment", "--epochs", "2", "--threads", "1"]
    r = _torchrun(tmp_path / "ddp", *common, "--stop-after-steps", "60")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2" in r.stdout
    r = _torchrun(tmp_path / "ddp", *common, "--resume")          # resumes in DDP too
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["ddp_params_in_sync"] is True
    assert s["epochs"] == 2 and s["eval_images"] == 1000
    assert s["test_accuracy"] > 60.0, s["accuracy_per_epoch"]
