"""Training on CPU: a real short MNIST run, exact resume, several seeds / folds, errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from models.training import optim as O
from models.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from models.training.cli import main, parse_args
from models.training.config import ConfigError
from models.training.datasets import write_idx
from models.training.runs import run_all

from conftest import CLI_CPU as CPU, SHARED, needs_mnist, run_cli as _run

pytestmark = pytest.mark.usefixtures("keep_threads")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """Random images and labels in MNIST's file layout: 200 train, 100 test (--no-verify)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir()
    for prefix, n in (("train", 200), ("t10k", 100)):
        write_idx(str(root / "mnist" / f"{prefix}-images-idx3-ubyte"),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(str(root / "mnist" / f"{prefix}-labels-idx1-ubyte"),
                  rng.integers(0, 10, n, dtype=np.uint8))
    return root


def _tiny(root, out, *args):
    """The command line of a one-second run on ``tiny_root``."""
    return [*CPU, "--data-root", str(root), "--no-verify", "--out", str(out), "--model",
            "cnn-fc", "--epochs", "2", "--batch-size", "50", "--no-augment", "--no-plot", *args]


def _strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=no_constants)


@needs_mnist
def test_real_mnist_run_learns(tmp_path):
    """The paper's small CNN on 4000 real MNIST images: far better than chance (10 %)."""
    summary = _run(tmp_path, "--model", "cnn", "--data", "mnist", "--epochs", "3",
                   "--batch-size", "64", "--train-subset", "4000", "--test-subset", "2000",
                   "--no-augment")
    assert summary["test_accuracy"] >= 80.0, summary["accuracy_per_epoch"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test_accuracy", "images_per_s", "params", "epochs", "epoch_times_s",
                "peak_gpu_memory_bytes", "config", "git_commit",
                "best_test_accuracy_test_selected"):
        assert key in on_disk
    assert on_disk["params"] == 21_840 and on_disk["epochs"] == 3 and on_disk["threads"] == 1
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    assert on_disk["images_per_s"] > 0 and len(on_disk["epoch_times_s"]) == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint.pt").exists()


@needs_mnist
def test_resume_is_bitwise_exact(tmp_path):
    """Stopped mid-epoch and resumed == uninterrupted: same weights, same accuracy.

    Augmentation and dropout (spinalkern's head and the CNN's Dropout2d) are on, so the
    random number generators must be restored exactly too.  The resumed run changes only
    resume-free settings (another data folder holding the same files, another checkpoint
    interval), and resumes from the previous checkpoint because the newest one is corrupt."""
    args = ["--model", "spinal-cnn-8", "--head-dropout", "0.2", "--backend", "torch",
            "--data", "mnist", "--epochs", "2", "--batch-size", "50", "--train-subset", "1000",
            "--test-subset", "500", "--no-plot", "--schedule", "cosine"]
    full = _run(tmp_path / "a", *args)
    # 20 steps per epoch: checkpoints every 5 steps, and at the stop (step 27).
    assert _run(tmp_path / "b", *args, "--stop-after-steps", "27",
                "--checkpoint-every-steps", "5") is None
    with pytest.raises(ConfigError, match="--resume"):
        _run(tmp_path / "b", *args)
    with pytest.raises(CheckpointError, match="threads: checkpoint has 1, this run has 2"):
        _run(tmp_path / "b", *args, "--resume", "--threads", "2")
    latest = tmp_path / "b" / "checkpoint.pt"
    assert read_checkpoint(str(latest))["global_step"] == 27
    blob = bytearray(latest.read_bytes())
    blob[len(blob) // 2] ^= 0x01                      # somewhere in the stored tensors
    latest.write_bytes(bytes(blob))
    other_root = tmp_path / "data"
    other_root.mkdir()
    (other_root / "mnist").symlink_to(os.path.join(SHARED, "mnist"))
    resumed = _run(tmp_path / "b", *args, "--resume", "--data-root", str(other_root),
                   "--checkpoint-every-steps", "7")
    assert read_checkpoint(str(tmp_path / "b" / "checkpoint.prev.pt"))["global_step"] == 35
    assert (tmp_path / "b" / "checkpoint.pt.corrupt").exists()
    a = read_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    b = read_checkpoint(str(latest))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["test_accuracy"] == resumed["test_accuracy"]
    assert full["accuracy_per_epoch"] == resumed["accuracy_per_epoch"]
    hist_a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hist_b = [json.loads(l) for l in (latest.parent / "metrics.jsonl").read_text().splitlines()]
    for ha, hb in zip(hist_a, hist_b):
        assert ha["train_loss"] == hb["train_loss"] and ha["eval_loss"] == hb["eval_loss"]
    assert [h["resumed_mid_epoch"] for h in hist_b] == [False, True]  # resumed at step 25
    # A checkpoint from another configuration is refused, naming the difference.
    with pytest.raises(CheckpointError, match="batch_size: checkpoint has 50, this run has 25"):
        _run(tmp_path / "b", *[a if a != "50" else "25" for a in args], "--resume")


@needs_mnist
def test_seeds_and_folds(tmp_path):
    s = _run(tmp_path, "--model", "cnn-fc", "--data", "mnist", "--epochs", "1", "--batch-size",
             "50", "--train-subset", "300", "--test-subset", "200", "--no-augment",
             "--seeds", "1", "2", "--folds", "2", "--no-plot")
    assert s["runs"] == 4 and len(s["val_accuracy_per_run"]) == 4
    assert s["val_accuracy_std"] >= 0 and 0 <= s["test_accuracy"] <= 100
    for label in ("seed1-fold0", "seed1-fold1", "seed2-fold0", "seed2-fold1"):
        sub = json.loads((tmp_path / label / "summary.json").read_text())
        assert sub["train_images"] == 150 and sub["eval_images"] == 150
    assert json.loads((tmp_path / "summary.json").read_text())["runs"] == 4


@needs_mnist
def test_sgd_step_schedule_label_smoothing_augment(tmp_path):
    s = _run(tmp_path, "--model", "progressive-cnn", "--backend", "torch", "--data", "mnist",
             "--epochs", "2", "--batch-size", "50", "--train-subset", "200", "--test-subset",
             "100", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "step", "--milestones",
             "1", "--label-smoothing", "0.1", "--hflip", "0.1")
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.005)
    assert s["epochs"] == 2


@needs_mnist
def test_cpu_bf16_autocast_and_checkpoint_interval(tmp_path):
    s = _run(tmp_path, "--model", "spinal-cnn-10", "--backend", "torch", "--data", "mnist",
             "--epochs", "2", "--batch-size", "32", "--train-subset", "256", "--test-subset",
             "100", "--amp", "bf16", "--checkpoint-every-epochs", "0", "--no-plot")
    assert s["amp"] == "bf16" and s["epochs"] == 2 and s["params"] == 16_050
    state = read_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["epoch"] == 2          # the final checkpoint is always written


def test_lr_schedules():
    spe, total = 100, 2500  # 25 epochs
    f = lambda step, sched, **kw: O.lr_at(step, total, spe, 1e-3, sched, **kw)  # noqa: E731
    assert f(0, "const") == 1e-3 and f(2499, "const") == 1e-3
    assert f(1499, "step", milestones=[15]) == pytest.approx(1e-3)
    assert f(1500, "step", milestones=[15]) == pytest.approx(1e-4)     # x0.1 at epoch 15
    assert f(0, "cosine") == pytest.approx(1e-3) and f(1250, "cosine") == pytest.approx(5e-4)
    assert f(2500, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert f(0, "onecycle") == pytest.approx(4e-5) and f(750, "onecycle") == pytest.approx(1e-3)
    assert f(2500, "onecycle") < 1e-8
    assert f(0, "const", warmup_steps=10) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        f(0, "exp")


def test_set_lr_in_place_for_tensor_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.1))
    t = opt.param_groups[0]["lr"]
    O.set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] is t and float(t) == 0.5     # same tensor: graph-safe
    opt2 = torch.optim.SGD([p], lr=0.1)
    O.set_lr(opt2, 0.2)
    assert opt2.param_groups[0]["lr"] == 0.2


# -- GPU paths (run where CUDA is available) ----------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_mnist
@pytest.mark.parametrize("amp,opt", [("bf16", "adam"), ("fp16", "adamw"), ("off", "sgd")])
def test_cuda_graph_training(tmp_path, amp, opt):
    s = _run(tmp_path, "--device", "cuda", "--model", "spinal-vgg5", "--data", "mnist",
             "--epochs", "2", "--batch-size", "128", "--train-subset", "4096", "--test-subset",
             "2000", "--amp", amp, "--optimizer", opt, "--lr", "0.01" if opt == "sgd" else "1e-3",
             "--cuda-graph", "on", "--schedule", "onecycle")
    assert s["cuda_graph"]["used"], s["cuda_graph"]
    assert s["test_accuracy"] > 80.0
    assert s["peak_gpu_memory_bytes"] > 0 and s["channels_last"] is True


@gpu
@needs_mnist
def test_cuda_graph_matches_eager_roughly_and_resumes(tmp_path):
    args = ["--device", "cuda", "--model", "spinal-resnet18", "--data", "mnist", "--epochs",
            "2", "--batch-size", "256", "--train-subset", "4096", "--test-subset", "1000",
            "--no-plot"]
    g = _run(tmp_path / "graph", *args, "--cuda-graph", "on")
    e = _run(tmp_path / "eager", *args, "--cuda-graph", "off")
    assert g["cuda_graph"]["used"] and not e["cuda_graph"]["used"]
    assert g["test_accuracy"] > 90 and e["test_accuracy"] > 90
    assert _run(tmp_path / "r", *args, "--stop-after-steps", "20") is None
    r = _run(tmp_path / "r", *args, "--resume")
    assert r["epochs"] == 2 and r["test_accuracy"] > 90


@gpu
@needs_mnist
def test_cuda_compile(tmp_path):
    s = _run(tmp_path, "--device", "cuda", "--model", "spinal-cnn-8", "--data", "mnist",
             "--epochs", "1", "--batch-size", "256", "--train-subset", "8192", "--compile")
    assert s["test_accuracy"] > 50


# -- runs that fail, and outputs that stay someone else's ---------------------------------------
def test_nonfinite_loss_stops_the_run(tmp_path, tiny_root, capsys):
    out = tmp_path / "run"
    assert main(_tiny(tiny_root, out, "--optimizer", "sgd", "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "diverged" in err and "--nonfinite-patience 0" in err
    assert not (out / "summary.json").exists() and not (out / "checkpoint.pt").exists()


def test_nonfinite_patience_and_strict_json(tmp_path, tiny_root):
    out = tmp_path / "run"
    assert main(_tiny(tiny_root, out, "--optimizer", "sgd", "--lr", "1e30",
                      "--nonfinite-patience", "1000")) == 0
    history = [_strict_json(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    summary = _strict_json((out / "summary.json").read_text())
    assert [h["nonfinite_steps"] for h in history] == [3, 4]    # all but the first step
    assert history[1]["train_loss"] is None and history[1]["eval_loss"] is None
    assert summary["test_loss"] is None and summary["epochs"] == 2


def test_outputs_are_never_overwritten(tmp_path, tiny_root):
    out = tmp_path / "run"
    assert main(_tiny(tiny_root, out)) == 0
    with pytest.raises(ConfigError, match="holds the outputs of another run.*--resume"):
        run_all(parse_args(_tiny(tiny_root, out)))
    (out / "checkpoint.pt").unlink()
    (out / "checkpoint.prev.pt").unlink()
    with pytest.raises(ConfigError, match=r"summary.json.*no checkpoint.*--overwrite"):
        run_all(parse_args(_tiny(tiny_root, out)))
    with pytest.raises(ConfigError, match="it has no checkpoint to resume from"):
        run_all(parse_args(_tiny(tiny_root, out, "--resume")))
    old = os.umask(0o022)
    try:
        run_all(parse_args(_tiny(tiny_root, out, "--overwrite", "--epochs", "1")))
    finally:
        os.umask(old)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    for name in ("summary.json", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    # Several runs: every run folder is checked before the first one starts.
    many = tmp_path / "many"
    assert main(_tiny(tiny_root, many / "seed2", "--epochs", "1")) == 0
    with pytest.raises(ConfigError, match="seed2 holds the outputs"):
        run_all(parse_args(_tiny(tiny_root, many, "--seeds", "1", "2")))
    assert not (many / "seed1").exists()


def test_malformed_checkpoint_is_a_cli_error(tmp_path, tiny_root, capsys):
    out = tmp_path / "run"
    assert main(_tiny(tiny_root, out, "--stop-after-steps", "3")) == 0
    state = read_checkpoint(str(out / "checkpoint.pt"))
    del state["optimizer"]
    write_checkpoint(state, str(out / "checkpoint.pt"))   # verifies, but cannot be resumed
    assert main(_tiny(tiny_root, out, "--resume")) == 2
    assert "not a usable checkpoint" in capsys.readouterr().err
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (out / "checkpoint.prev.pt").unlink()
    assert main(_tiny(tiny_root, out, "--resume")) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
